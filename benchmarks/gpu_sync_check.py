"""On a GPU machine: train a small random model one step with FSDP2 on CUDA, sync it into an embedded engine by
each mode, and report how far the engine's log-probs are from the trainer's (bf16 compute on GPU vs fp32 engine).

Usage: python benchmarks/gpu_sync_check.py TOKENIZER_DIR OUT_DIR [ENGINE_DEVICE]
ENGINE_DEVICE: cpu (default) or cuda — the engine then shares the trainer's GPU as a separate process, and its greedy
output is first compared token for token with transformers' `generate` on the same GPU.
"""

from __future__ import annotations

import json
import sys
import tempfile

import ray
import torch

from slime.config.arguments import parse_args
from slime.engine.launch import launch_engine
from slime.ray.train_group import TrainGroup
from tests.conftest import build_tiny_llama
from tests.trainer.test_training import _generate, _max_diff


def main() -> None:
    tokenizer_dir, out_dir = sys.argv[1], sys.argv[2]
    engine_device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    model = build_tiny_llama(tokenizer_dir, tempfile.mkdtemp(prefix="tiny-"), hidden_size=256, layers=4)
    ray.init(num_gpus=torch.cuda.device_count(), num_cpus=8, include_dashboard=False)
    engine = launch_engine(model, out_dir, num_threads=4, device=engine_device)
    results: dict = {"engine_device": engine_device}
    try:
        results["greedy_equals_transformers"] = _greedy_matches(model, engine.url, engine_device)
        for mode in ("tensor", "distributed", "disk"):
            args = parse_args(
                [
                    "--hf-checkpoint",
                    model,
                    "--prompt-data",
                    "builtin:arithmetic",
                    "--rm-type",
                    "math",
                    "--rollout-temperature",
                    "0.8",
                    "--output-dir",
                    out_dir,
                    "--update-weight-mode",
                    mode,
                    "--lr",
                    "0.05",
                    "--rollout-batch-size",
                    "4",
                    "--n-samples-per-prompt",
                    "2",
                ],
                cluster_gpus=torch.cuda.device_count(),
            )
            group = TrainGroup(args)
            try:
                group.call("connect_engines", [engine.url])
                train = group.train(0, _generate(engine.url, 8, seed=1)[0])
                stale, _ = _generate(engine.url, 8, seed=2)
                before = _max_diff(stale, group.call("log_probs", stale)[0])
                sync = group.update_weights(f"{mode}-1")
                fresh, fresh_version = _generate(engine.url, 8, seed=2)
                after = _max_diff(fresh, group.call("log_probs", fresh)[0])
                results[mode] = {
                    "grad_norm": train["train/grad_norm"],
                    "max_diff_before_sync": before,
                    "max_diff_after_sync": after,
                    "engine_version": fresh_version,
                    "sync_seconds": sync["sync/seconds"],
                }
            except Exception as exc:  # noqa: BLE001 - report every mode
                results[mode] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            finally:
                group.shutdown()
            print(mode, json.dumps(results[mode]), flush=True)
    finally:
        engine.stop()
        ray.shutdown()
    with open(f"{out_dir}/gpu_sync_check_{engine_device}.json", "w") as f:
        json.dump(results, f, indent=1)


def _greedy_matches(model_path: str, url: str, device: str) -> bool:
    """16 new tokens for 4 prompts, greedy: the engine's ids against transformers' generate (fp32, same device)."""
    from transformers import AutoModelForCausalLM

    from slime.utils.http_utils import request_sync

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [100, 200, 300, 400], [42] * 6]
    for ids in prompts:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}
        status, text = request_sync("POST", f"{url}/generate", body, timeout=120)
        engine_ids = json.loads(text)["output_ids"]
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids], device=device), max_new_tokens=16, do_sample=False, min_new_tokens=16
            )[0, len(ids) :].tolist()
        if engine_ids != ref:
            print("greedy mismatch", ids, engine_ids, ref, flush=True)
            return False
    return True


if __name__ == "__main__":
    main()
