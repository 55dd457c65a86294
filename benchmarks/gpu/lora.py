"""Full fine-tuning against LoRA on one GPU, side by side in one call (issue 29): trainer memory, step time by phase,
sync bytes and seconds, checkpoint size.

Usage (repo root, on the GPU machine):
    python benchmarks/gpu/lora.py TOKENIZER_DIR OUT_DIR [--real MODEL_DIR DATA_DIR] [--models smollm2,qwen3-0.6b]
`smollm2`: the real SmolLM2-135M-Instruct weights (MODEL_DIR, converted by slime.hub.provision.convert_gguf) on
math word problems from DATA_DIR (slime-format JSONL, e.g. the MAWPS split of the shared data). `qwen3-0.6b`: a
random-weight model of the Qwen3-0.6B shape on built-in arithmetic. Each variant (full, LoRA with merged sync, LoRA
with adapter-only sync) is one `slime.train` run in the default shared layout: 32 prompts x 8 samples, <= 256 new
tokens, one optimizer step per rollout, a checkpoint after the last step. Figures are means over steps 1.. (step 0
compiles). Writes OUT_DIR/lora_gpu.json after every run; exits non-zero when a run fails or LoRA does not save
what it should (training state, adapter sync bytes, checkpoint size), or an engine serves other weights than the
trainer trained (log-prob gap).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu.real_weights import grpo_flags, split  # noqa: E402
from benchmarks.gpu.run import build_model, finish  # noqa: E402

STEPS, PROMPTS, NEW_TOKENS = 4, 32, 256
RANK = 16
VARIANTS = {  # name -> (extra flags, learning rate)
    "full": ([], "1e-6"),
    "lora": (["--lora-rank", str(RANK)], "1e-5"),
    "lora_adapters": (["--lora-rank", str(RANK), "--lora-sync", "adapters"], "1e-5"),
    # where LoRA's extra training time goes: the same without the compiled norm/MLP/rotary kernels
    "full_eager": (["--train-compile", "off"], "1e-6"),
    "lora_adapters_eager": (["--lora-rank", str(RANK), "--lora-sync", "adapters", "--train-compile", "off"], "1e-5"),
}
MEANS = {  # result key -> metrics.jsonl key, averaged over the timed steps
    "step_seconds": "perf/step_seconds",
    "rollout_seconds": "perf/rollout_seconds",
    "train_seconds": "train/seconds",
    "sync_seconds": "sync/seconds",
    "sync_bytes": "sync/bytes",
    "train_peak_memory_gb": "perf/train_peak_memory_gb",
    "logprob_abs_diff_vs_rollout": "train/logprob_abs_diff_vs_rollout",
}


def run_variant(model: str, data: str, name: str, work: Path, steps: int = STEPS) -> dict:
    extra, lr = VARIANTS[name]
    out = work / name
    flags = grpo_flags(model, data, str(out), PROMPTS, NEW_TOKENS, steps, lr)
    flags += ["--save", str(out / "ckpt"), "--save-interval", str(steps), "--disable-report", *extra]
    start = time.monotonic()
    with open(work / f"{name}.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "slime.train", *flags], stdout=log, stderr=subprocess.STDOUT)
    if code.returncode:
        raise RuntimeError(f"{name} exited {code.returncode}: {(work / f'{name}.log').read_text()[-2500:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    timed = [r for r in rows if "train/seconds" in r][1:]
    ckpt = next((out / "ckpt").glob("iter_*"))
    result = {k: statistics.mean(r[m] for r in timed if m in r) for k, m in MEANS.items() if m in timed[0]}
    return result | {
        "lr": float(lr),
        "wall_seconds": time.monotonic() - start,
        "first_step_seconds": rows[0].get("perf/step_seconds"),
        "trainable_parameters": timed[0]["train/trainable_parameters"],
        "train_state_bytes": timed[0]["perf/train_state_bytes"],
        "checkpoint_policy_bytes": sum(f.stat().st_size for f in (ckpt / "policy").rglob("*") if f.is_file()),
        "reward_per_step": [r["rollout/reward_mean"] for r in rows if "rollout/reward_mean" in r],
    }


def checks(runs: dict) -> list[str]:
    bad = []
    full = runs.get("full")
    for name, r in runs.items():
        if "error" in r:
            bad.append(f"{name}: {r['error'][:300]}")
        elif r.get("logprob_abs_diff_vs_rollout", 0) > 0.1:  # bf16 engine against the trainer: ~0.02-0.03
            bad.append(f"{name}: engine/trainer log-prob gap {r['logprob_abs_diff_vs_rollout']:.3f} > 0.1")
    for name in ("lora", "lora_adapters"):
        r = runs.get(name)
        if not full or "error" in full or not r or "error" in r:
            continue
        if r["train_state_bytes"] > 0.5 * full["train_state_bytes"]:
            bad.append(f"{name}: training state {r['train_state_bytes']:.3g} B not below half of full's")
        if r["checkpoint_policy_bytes"] > 0.1 * full["checkpoint_policy_bytes"]:
            bad.append(f"{name}: checkpoint {r['checkpoint_policy_bytes']:.3g} B not below 0.1x full's")
        if name == "lora_adapters" and r["sync_bytes"] > 0.1 * full["sync_bytes"]:
            bad.append(f"{name}: sync {r['sync_bytes']:.3g} B not below 0.1x full's")
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tokenizer_dir")
    p.add_argument("out_dir")
    p.add_argument("--real", nargs=2, metavar=("MODEL_DIR", "DATA_DIR"), help="real SmolLM2 weights and data")
    p.add_argument("--models", default="smollm2,qwen3-0.6b")
    p.add_argument("--variants", default="full,lora,lora_adapters", help="of: " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=STEPS, help="GRPO steps per run (the first compiles, untimed)")
    p.add_argument("--out-name", default="lora_gpu.json")
    a = p.parse_args()
    out_file = Path(a.out_dir) / a.out_name
    result = {"benchmark": "lora_gpu", "date": time.strftime("%Y-%m-%d"), "steps": a.steps, "lora_rank": RANK}
    result |= {"workload": f"{PROMPTS} prompts x 8 samples, <= {NEW_TOKENS} new tokens", "models": {}}
    result["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in a.models.split(","):
            work = Path(tmp, model_name)
            work.mkdir()
            if model_name == "smollm2":
                if not a.real:
                    raise SystemExit("--models smollm2 needs --real MODEL_DIR DATA_DIR")
                model = a.real[0]
                data, _, _ = split(a.real[1], str(work))
            else:
                model = build_model(model_name, a.tokenizer_dir, str(work / "model"))
                data = "builtin:arithmetic:train:2048:0"
            runs = result["models"].setdefault(model_name, {})
            for name in a.variants.split(","):
                try:
                    runs[name] = run_variant(model, data, name, work, a.steps)
                except Exception as exc:  # the other variants still run and report
                    runs[name] = {"error": f"{type(exc).__name__}: {exc}"}
                out_file.write_text(json.dumps(result, indent=1))
                print(f"{model_name} {name}: {json.dumps(runs[name])[:600]}", flush=True)
            full = runs.get("full", {})
            if "error" not in full:
                keys = ("step_seconds", "train_seconds", "sync_seconds", "sync_bytes", "train_peak_memory_gb",
                        "train_state_bytes", "checkpoint_policy_bytes")  # fmt: skip
                result.setdefault("ratios_over_full", {})[model_name] = {
                    n: {k: r[k] / full[k] for k in keys if full.get(k) and k in r}
                    for n, r in runs.items()
                    if n != "full" and "error" not in r
                }
    bad = [f"{m}: {b}" for m, runs in result["models"].items() for b in checks(runs)]
    finish(result, out_file, bad)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
