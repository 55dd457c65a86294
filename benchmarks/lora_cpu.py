"""Full fine-tuning against LoRA in the demo's configuration (SmolLM2-135M-Instruct, built-in arithmetic, CPU), one
after the other in one process: step time split by phase, trainer state (weights + gradients + AdamW moments), sync
bytes and seconds, checkpoint size, and held-out accuracy before and after.

    .venv/bin/python benchmarks/lora_cpu.py --steps 10 --out benchmarks/results/lora_cpu_<date>.json

LoRA gets its own learning rate (--lora-lr, default 10x the demo's 3e-5): adapters start at zero and want a larger
step than full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from slime.demo import DEMO_FLAGS


def _flag(flags: list[str], name: str, value: str) -> list[str]:
    out = list(flags)
    out[out.index(name) + 1] = value
    return out


def run(name: str, extra: list[str], steps: int, lr: str, root: Path) -> dict:
    out = root / name
    flags = _flag(_flag(_flag(DEMO_FLAGS, "--num-rollout", str(steps)), "--eval-interval", str(steps)), "--lr", lr)
    flags = _flag(flags, "--output-dir", str(out))
    flags += ["--save", str(out / "ckpt"), "--save-interval", str(steps), "--disable-report", *extra]
    start = time.monotonic()
    done = subprocess.run([os.sys.executable, "-m", "slime.train", *flags], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    trained = [r for r in rows if "train/seconds" in r][1:]  # step 0 warms up
    evals = [r for r in rows if "eval/arithmetic_test/accuracy" in r]
    ckpt = next((out / "ckpt").glob("iter_*"))

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in trained)

    return {
        "lr": float(lr),
        "wall_seconds": time.monotonic() - start,
        "step_seconds": mean("perf/step_seconds"),
        "rollout_seconds": mean("perf/rollout_seconds"),
        "train_seconds": mean("train/seconds"),
        "sync_seconds": mean("sync/seconds"),
        "sync_bytes": mean("sync/bytes"),
        "trainable_parameters": trained[0]["train/trainable_parameters"],
        "train_state_bytes": trained[0]["perf/train_state_bytes"],
        "checkpoint_policy_bytes": sum(f.stat().st_size for f in (ckpt / "policy").iterdir()),
        "accuracy_before": evals[0]["eval/arithmetic_test/accuracy"],
        "accuracy_after": evals[-1]["eval/arithmetic_test/accuracy"],
    }


VARIANTS = {  # name -> (extra flags, learning rate flag of the parser below)
    "full": ([], "full_lr"),
    "lora": (["--lora-rank", "{rank}"], "lora_lr"),
    "lora_adapters": (["--lora-rank", "{rank}", "--lora-sync", "adapters"], "lora_lr"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="GRPO steps per run")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--full-lr", default="3e-5", help="full fine-tuning's learning rate (the demo's)")
    p.add_argument("--lora-lr", default="3e-4", help="LoRA's learning rate")
    p.add_argument("--variants", default=",".join(VARIANTS), help="which runs, comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--out", default=None, help="JSON results file; variants already in it and not run are kept")
    a = p.parse_args()
    result = json.loads(Path(a.out).read_text()) if a.out and Path(a.out).exists() else {"runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.variants.split(","):
            extra, lr = VARIANTS[name]
            extra = [x.format(rank=a.lora_rank) for x in extra]
            result["runs"][name] = run(name, extra, a.steps, getattr(a, lr), Path(tmp))
    runs = result["runs"]
    result |= {
        "benchmark": "lora_cpu",
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{os.cpu_count()} CPUs",
        "steps": a.steps,
        "lora_rank": a.lora_rank,
    }
    if "full" in runs:
        keys = ("step_seconds", "train_seconds", "sync_seconds", "sync_bytes", "train_state_bytes",
                "checkpoint_policy_bytes")  # fmt: skip
        full = runs["full"]
        result["ratios_over_full"] = {
            name: {k: r[k] / full[k] for k in keys if full[k]} for name, r in runs.items() if name != "full"
        }
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
