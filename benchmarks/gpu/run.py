"""The GPU benchmark: one device call measures the embedded engine, the trainer, weight sync and whole GRPO steps.

Usage (repo root, on the GPU machine): python benchmarks/gpu/run.py TOKENIZER_DIR OUT_DIR [--grpo-only]
    [--grpo-models a,b] [--steps N] (GRPO steps per model, default 2)
Writes OUT_DIR/gpu_benchmark.json after every section (a failing section is recorded and the rest still run; server
logs and run folders stay in a temporary folder) and prints a table. Models are random-weight (no hub on the GPU
machines): a Qwen3-0.6B-shaped model and a SmolLM2-135M-shaped model, with the tokenizer of TOKENIZER_DIR; the
embedding is scaled up so the output distribution is peaked and log-prob comparisons mean something.

Sections, per model:
- rollout: 256 prompts x 128 tokens, 256 new tokens each (ignore_eos, temperature 1), bf16 engine on the GPU;
- trainer: one rollout's training (old log-probs pass + forward/backward + AdamW) of 64 samples x 384 tokens, FSDP2
  bf16 compute with fp32 master weights; MFU against the bf16 matmul peak measured at the start;
- sync: weight-sync time and GB/s per mode into an engine on the same GPU; for tensor (CUDA IPC), the engine's
  log-probs against the trainer's before and after the sync;
- grpo: slime.train.train for 2 rollouts, Qwen3 colocated and SmolLM2 sharing the GPU as separate processes; the
  second step's phases and memory from metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

import ray
import torch

from slime.config.arguments import parse_args
from slime.engine.launch import launch_engine
from slime.ray.train_group import TrainGroup
from slime.utils.http_utils import request_sync
from slime.utils.types import TrainBatch
from tests.trainer.test_training import _generate

STEPS = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 2
MODELS = {
    "qwen3-0.6b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=1e5,
        tie_word_embeddings=True,
    ),
}
PROMPTS, PROMPT_LEN, NEW_TOKENS = 256, 128, 256
TRAIN_SAMPLES, TRAIN_RESPONSE = 64, 256


def build_model(name: str, tokenizer_dir: str, out: str, spec: dict | None = None) -> str:
    """A random-weight model shaped MODELS[name] (or `spec`), with the tokenizer of `tokenizer_dir`, saved in `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = dict(spec or MODELS[name])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        **spec,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def matmul_flops_per_token(path: str, seq_len: int) -> tuple[float, int]:
    """Forward FLOPs per token of a sequence of `seq_len` (linear layers incl. the LM head, plus causal attention
    scores and values at the average context), and the model's parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * (seq_len + 1) / 2
    return 2 * linear + attention, sum(p.numel() for p in model.parameters())


def bf16_peak() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, iters = time.perf_counter(), 20
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * iters / (time.perf_counter() - start)


def rollout_throughput(url: str, vocab: int) -> dict:
    rng = random.Random(0)

    def run(n: int, new: int) -> tuple[int, float]:
        prompts = [[rng.randrange(100, min(vocab, 49152)) for _ in range(PROMPT_LEN)] for _ in range(n)]
        body = {
            "input_ids": prompts,
            "sampling_params": {"max_new_tokens": new, "temperature": 1.0, "ignore_eos": True},
        }
        start = time.perf_counter()
        status, text = request_sync("POST", f"{url}/generate", body, timeout=900)
        assert status == 200, text[:500]
        return sum(len(o["output_ids"]) for o in json.loads(text)), time.perf_counter() - start

    run(16, 16)  # warm-up: CUDA context, kernels, allocator
    _, seconds = run(PROMPTS, 16)  # a full batch for 16 steps: how long would the whole workload take?
    new = NEW_TOKENS if seconds * NEW_TOKENS / 16 < 100 else max(16, int(100 * 16 / seconds))  # one call's budget
    tokens, seconds = run(PROMPTS, new)
    return {
        "prompts": PROMPTS,
        "new_tokens": new,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def train_args(path: str, out: str, mode: str = "tensor") -> object:
    return parse_args(
        [
            "--hf-checkpoint",
            path,
            "--prompt-data",
            "builtin:arithmetic",
            "--rm-type",
            "math",
            "--output-dir",
            out,
            "--rollout-batch-size",
            str(TRAIN_SAMPLES // 8),
            "--n-samples-per-prompt",
            "8",
            "--use-dynamic-batch-size",
            "--max-tokens-per-gpu",
            "4096",
            "--lr",
            "2e-3",
            "--rollout-temperature",
            "0.8",
            "--update-weight-mode",
            mode,
            "--rollout-engine-dtype",
            "bfloat16",
        ],
        cluster_gpus=torch.cuda.device_count(),
    )


def synthetic_rollout(vocab: int) -> TrainBatch:
    rng = random.Random(1)
    total = PROMPT_LEN + TRAIN_RESPONSE
    return TrainBatch(
        tokens=[[rng.randrange(100, min(vocab, 49152)) for _ in range(total)] for _ in range(TRAIN_SAMPLES)],
        response_lengths=[TRAIN_RESPONSE] * TRAIN_SAMPLES,
        loss_masks=[[1] * TRAIN_RESPONSE] * TRAIN_SAMPLES,
        rewards=[float(i % 2) for i in range(TRAIN_SAMPLES)],
    )


def logprob_gaps(data: TrainBatch, trainer_log_probs: list[list[float]]) -> list[float]:
    """|trainer - engine| log-prob of every sampled token."""
    return [
        abs(a - b)
        for got, want in zip(trainer_log_probs, data.rollout_log_probs, strict=True)
        for a, b in zip(got, want, strict=True)
    ]


def trainer_and_sync(name: str, path: str, url: str, out: str, peak: float) -> dict:
    """Trainer throughput and MFU, then each sync mode into the engine at `url` (log-probs checked for tensor)."""
    vocab = MODELS[name]["vocab_size"]
    per_token_fwd, params = matmul_flops_per_token(path, PROMPT_LEN + TRAIN_RESPONSE)
    result: dict = {"params": params}
    for mode in ("tensor", "disk"):
        group = TrainGroup(train_args(path, out, mode))
        try:
            group.call("connect_engines", [url])
            if mode == "tensor":
                data = ray.put(synthetic_rollout(vocab))
                group.train(0, data)  # warm-up
                m = [group.train(i, data) for i in (1, 2)][-1]
                tokens = TRAIN_SAMPLES * (PROMPT_LEN + TRAIN_RESPONSE)
                flops = tokens * per_token_fwd * 4  # no-grad log-prob pass (1x) + forward/backward (3x)
                seconds = m["train/seconds"]
                result["trainer"] = {
                    "tokens": tokens,
                    "seconds": seconds,
                    "tokens_per_s": m["train/tokens_per_s"],
                    "tflops": flops / seconds / 1e12,
                    "mfu": flops / seconds / peak,
                }
                stale, _ = _generate(url, 16, seed=2)
                before = max(logprob_gaps(stale, group.call("log_probs", stale)[0]))
            sync = group.update_weights(f"{mode}-1")
            entry = {
                "seconds": sync["sync/seconds"],
                "gb": sync["sync/bytes"] / 1e9,
                "gb_per_s": sync["sync/bytes"] / 1e9 / sync["sync/seconds"],
            }
            if mode == "tensor":
                fresh, fresh_version = _generate(url, 16, seed=2)
                diffs = logprob_gaps(fresh, group.call("log_probs", fresh)[0])
                entry |= {
                    "logprob_max_diff_before_sync": before,
                    "logprob_max_diff_after_sync": max(diffs),
                    "logprob_mean_diff_after_sync": sum(diffs) / len(diffs),
                    "engine_version": fresh_version,
                }
            result[f"sync_{mode}"] = entry
        finally:
            group.shutdown()
    result["sync_distributed"] = {"skipped": "NCCL sync needs the engine on a GPU of its own; this machine has 1"}
    return result


def grpo_steps(name: str, path: str, out: str, colocate: bool) -> dict:
    from slime.train import train

    run_dir = os.path.join(out, f"grpo-{name}")
    args = parse_args(
        [
            "--hf-checkpoint",
            path,
            "--prompt-data",
            "builtin:arithmetic:train:512:0",
            "--input-key",
            "prompt",
            "--label-key",
            "label",
            "--rm-type",
            "math",
            "--rollout-batch-size",
            "32",
            "--n-samples-per-prompt",
            "8",
            "--rollout-max-response-len",
            "128",
            "--rollout-temperature",
            "1.0",
            "--num-rollout",
            str(STEPS),
            "--global-batch-size",
            "128",
            "--use-dynamic-batch-size",
            "--max-tokens-per-gpu",
            "4096",
            "--lr",
            "1e-5",
            "--output-dir",
            run_dir,
            *(["--colocate"] if colocate else []),
        ],
        cluster_gpus=torch.cuda.device_count(),
    )
    start = time.perf_counter()
    train(args)
    steps = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    keep = (
        "perf/",
        "engine/",
        "sync/",
        "train/seconds",
        "train/tokens_per_s",
        "train/logprob_abs_diff_vs_rollout",
        "rollout/response_len",
        "rollout/tokens_per_s",
        "rollout/weight_version",
    )
    mode = "colocated" if colocate else "shared, separate processes"
    return {
        "mode": mode,
        "wall_seconds": time.perf_counter() - start,
        "steps": [{k: v for k, v in s.items() if k.startswith(keep)} for s in steps],
    }


def finish(results: dict, path: Path, checks: list[str]) -> NoReturn:
    """End a benchmark: the failed checks into the results, the results to `path`, a line, and a non-zero exit
    status when a check failed (so a regression is seen)."""
    results["failed_checks"] = checks
    path.write_text(json.dumps(results, indent=1))
    print("checks:", checks or "all passed")
    sys.exit(1 if checks else 0)


def run_section(results: dict, path: Path, key: str, fn, *args) -> None:
    """results[key] = fn(*args), or the error it raised (the rest still runs); its seconds as key + "_seconds";
    print a line and rewrite the results file, so a run cut short still leaves what it measured."""
    start = time.perf_counter()
    try:
        results[key] = fn(*args)
    except Exception as exc:  # noqa: BLE001 - record it and measure the rest
        results[key] = {"error": f"{type(exc).__name__}: {exc}"[:3000], "traceback": traceback.format_exc()[-3000:]}
    results[key + "_seconds"] = time.perf_counter() - start
    print(f"[{results[key + '_seconds']:6.1f}s] {key}: {json.dumps(results[key])[:800]}", flush=True)
    path.write_text(json.dumps(results, indent=1))


def main() -> None:
    tokenizer_dir, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    results_path = Path(out) / "gpu_benchmark.json"

    def section(key: str, fn, *a):
        run_section(results, results_path, key, fn, *a)

    results["bf16_peak_tflops"] = bf16_peak() / 1e12
    ray.init(num_gpus=torch.cuda.device_count(), num_cpus=os.cpu_count(), include_dashboard=False)
    work = tempfile.mkdtemp(prefix="gpu-bench-")
    paths = {name: build_model(name, tokenizer_dir, os.path.join(work, name)) for name in MODELS}
    for name, path in paths.items() if "--grpo-only" not in sys.argv else ():
        # the trainer shares this GPU in train_sync: the engine keeps to the share slime's placement gives it then
        engine = launch_engine(
            path,
            os.path.join(work, "logs"),
            index=0,
            dtype="bfloat16",
            device="cuda",
            max_running_requests=PROMPTS,
            num_threads=4,
            mem_fraction_static=0.35,
        )
        try:
            section(f"{name}/rollout", rollout_throughput, engine.url, MODELS[name]["vocab_size"])
            peak = results["bf16_peak_tflops"] * 1e12
            section(f"{name}/train_sync", trainer_and_sync, name, path, engine.url, work, peak)
        finally:
            engine.stop()
    grpo = sys.argv[sys.argv.index("--grpo-models") + 1].split(",") if "--grpo-models" in sys.argv else list(MODELS)
    if "qwen3-0.6b" in grpo:
        section("qwen3-0.6b/grpo", grpo_steps, "qwen3-0.6b", paths["qwen3-0.6b"], work, True)
    if "smollm2-135m" in grpo:
        section("smollm2-135m/grpo", grpo_steps, "smollm2-135m", paths["smollm2-135m"], work, False)
    ray.shutdown()
    results["failed_checks"] = failed_checks(results)
    results_path.write_text(json.dumps(results, indent=1))
    print_table(results)
    sys.exit(1 if results["failed_checks"] else 0)


def failed_checks(r: dict) -> list[str]:
    """What must hold for the run to be green: every section ran; after a CUDA-IPC sync the bf16 engine's log-probs
    are within bf16 tolerance of the trainer's (bf16 compute): mean |diff| < 0.05 and max < 0.25 nats (bf16 keeps 8
    bits of mantissa, and these peaked models have log-probs down to -80), where before the sync the max was > 1;
    in the loop, each rollout was generated with the previous sync's weights, engine and trainer agree to 0.05 per
    token on average, and the colocated run freed > 90% of each side's GPU memory while the other worked."""
    bad = [f"{k}: {v['error'][:200]}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
    for name in MODELS:
        sync = r.get(f"{name}/train_sync", {}).get("sync_tensor", {})
        worst, mean = sync.get("logprob_max_diff_after_sync", 1e9), sync.get("logprob_mean_diff_after_sync", 1e9)
        if sync and not (mean < 0.05 and worst < 0.25 < 1 < sync["logprob_max_diff_before_sync"]):
            bad.append(f"{name}: log-probs before/after the tensor sync {sync}")
        grpo = r.get(f"{name}/grpo", {})
        for i, step in enumerate(grpo.get("steps", [])):
            if step["rollout/weight_version"] != i or step["train/logprob_abs_diff_vs_rollout"] > 0.05:
                bad.append(f"{name} grpo step {i}: weight version / engine-trainer log-prob gap {step}")
            if grpo["mode"] == "colocated":
                for what in ("engine_release", "offload"):
                    before, after = step[f"perf/{what}_gpu_gb_before"], step[f"perf/{what}_gpu_gb_after"]
                    if not after < 0.1 * before:
                        bad.append(f"{name} grpo step {i}: {what} left {after:.2f} of {before:.2f} GB")
    return bad


def print_table(r: dict) -> None:
    print(f"\n{r['device']}  {r['date']}  bf16 matmul peak {r['bf16_peak_tflops']:.0f} TFLOP/s")
    for name in MODELS:
        ro, ts = r.get(f"{name}/rollout", {}), r.get(f"{name}/train_sync", {})
        tr = ts.get("trainer", {})
        print(
            f"{name}: rollout {ro.get('tokens_per_s', float('nan')):,.0f} tok/s | trainer "
            f"{tr.get('tokens_per_s', float('nan')):,.0f} tok/s, MFU {tr.get('mfu', float('nan')):.1%}"
        )
        for mode in ("tensor", "disk"):
            s = ts.get(f"sync_{mode}", {})
            print(
                f"  sync {mode}: {s.get('seconds', float('nan')):.3f} s, {s.get('gb_per_s', float('nan')):.1f} GB/s "
                f"log-prob |diff| after: max {s.get('logprob_max_diff_after_sync', '-')} mean "
                f"{s.get('logprob_mean_diff_after_sync', '-')}"
            )
        g = r.get(f"{name}/grpo", {})
        if g.get("steps"):
            last = g["steps"][-1]
            phases = {k: round(v, 3) for k, v in last.items() if k.endswith("seconds")}
            print(f"  grpo ({g['mode']}): {phases}")
    print("checks:", "all passed" if not r["failed_checks"] else "\n  ".join(["FAILED", *r["failed_checks"]]))


if __name__ == "__main__":
    main()
