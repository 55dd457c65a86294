"""On a GPU machine: checkpoint round trip of an FSDP2 policy trained on CUDA (bf16 compute, fp32 master weights).

Trains a random 4-layer Llama one rollout, saves a checkpoint and a Hugging Face export, trains one more rollout;
then a fresh training group loads the checkpoint and trains the same rollout. Reports whether the reloaded policy
gives the same log-probs and the same next step, how far the exported folder's fp32 log-probs are from the trainer's
bf16 ones, and save / load / export seconds.

Usage: python benchmarks/gpu_checkpoint_check.py TOKENIZER_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from slime.config.arguments import parse_args
from slime.ray.train_group import TrainGroup
from slime.trainer import checkpoint
from tests.conftest import build_tiny_llama
from tests.trainer.test_checkpoint import save_trainer_checkpoint
from tests.trainer.test_training import _synthetic_batch


def flat(log_probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for lp in log_probs for x in lp], dtype=torch.float64)


def hf_log_probs(folder: Path, data: dict) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    out = []
    with torch.no_grad():
        for tokens, n in zip(data["tokens"], data["response_lengths"], strict=True):
            logits = model(input_ids=torch.tensor([tokens], device="cuda")).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:], device="cuda")[:, None])[:, 0]
            out.append(lp[-n:].double().cpu())
    return torch.cat(out)


def main() -> None:
    tokenizer_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    model = build_tiny_llama(tokenizer_dir, tempfile.mkdtemp(prefix="tiny-"), hidden_size=256, layers=4)
    ray.init(num_gpus=torch.cuda.device_count(), num_cpus=8, include_dashboard=False)
    args = parse_args(
        [
            "--hf-checkpoint",
            model,
            "--prompt-data",
            "builtin:arithmetic",
            "--rm-type",
            "math",
            "--output-dir",
            str(out_dir),
            "--rollout-batch-size",
            "4",
            "--n-samples-per-prompt",
            "4",
            "--global-batch-size",
            "8",
            "--lr",
            "0.01",
        ],
        cluster_gpus=torch.cuda.device_count(),
    )
    data, later = _synthetic_batch(16, seed=1), _synthetic_batch(16, seed=2)
    work = Path(tempfile.mkdtemp(prefix="ckpt-"))
    save, hf = work / "ckpt", work / "hf"
    result: dict = {"device": torch.cuda.get_device_name(0)}
    group = TrainGroup(args)
    try:
        group.train(0, data)
        start = time.monotonic()
        save_trainer_checkpoint(group, save, 0)
        result["save_s"] = time.monotonic() - start
        start = time.monotonic()
        group.call("export_hf", str(hf))
        result["export_s"] = time.monotonic() - start
        before = flat(group.call("log_probs", later)[0])
        continued = group.train(1, later)
    finally:
        group.shutdown()
    group = TrainGroup(args)
    try:
        start = time.monotonic()
        group.call("load", str(checkpoint.latest(save)[1]))
        result["load_s"] = time.monotonic() - start
        after = flat(group.call("log_probs", later)[0])
        resumed = group.train(1, later)
    finally:
        group.shutdown()
    result["reloaded_logprob_max_abs_diff"] = float((after - before).abs().max())
    keys = ("train/loss", "train/grad_norm", "train/param_norm")
    result["next_step"] = {k: [continued[k], resumed[k]] for k in keys}
    result["next_step_equal"] = all(continued[k] == resumed[k] for k in keys)
    result["hf_export_vs_trainer_max_abs_diff"] = float((hf_log_probs(hf, later) - before).abs().max())
    checkpoint.convert(save, work / "converted")
    result["convert_vs_export_max_abs_diff"] = float(
        (hf_log_probs(work / "converted", later) - hf_log_probs(hf, later)).abs().max()
    )
    (out_dir / "gpu_checkpoint.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
