"""Checkpoint, resume and engine-recovery costs on the demo configuration (SmolLM2-135M-Instruct, CPU).

1. The demo, 3 rollouts, a checkpoint and a Hugging Face export after every rollout; killed (-9) as soon as the
   first checkpoint is published, then the same command again: it resumes and finishes.
2. The demo with 2 engines and --use-fault-tolerance, 2 rollouts: engine 0 is SIGKILLed in the middle of rollout 0
   and engine 1 SIGSTOPped (hung) at the start of rollout 1 (tests.custom_hooks.sabotage_engines_generate).
3. One rollout (no training) with and without --sglang-enable-deterministic-inference: what reproducibility costs.

Usage: .venv/bin/python benchmarks/checkpoint_recovery.py [--out outputs/checkpoint_recovery]
Prints a markdown table; raw logs and metrics under OUT.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from slime.demo import DEMO_FLAGS

ROOT = Path(__file__).resolve().parents[1]
EVAL_FLAGS = {"--eval-prompt-data": 2, "--eval-interval": 1, "--eval-temperature": 1}  # flag: values it takes


def without_eval(flags: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(flags):
        if flags[i] in EVAL_FLAGS:
            i += 1 + EVAL_FLAGS[flags[i]]
        else:
            out.append(flags[i])
            i += 1
    return out


BASE = without_eval(DEMO_FLAGS)


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "slime.train", *BASE, "--output-dir", str(out), *extra]


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def seconds(pattern: str, text: str) -> list[float]:
    return [float(x) for x in re.findall(pattern, text)]


def resume_run(out: Path) -> dict:
    ckpt = out / "ckpt"
    out.mkdir(parents=True)
    cmd = command(
        out,
        "--num-rollout",
        "3",
        "--save-interval",
        "1",
        "--save",
        str(ckpt),
        "--load",
        str(ckpt),
        "--save-hf",
        str(out / "hf" / "{rollout_id}"),
    )
    start = time.monotonic()
    with open(out / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while not (ckpt / "latest_checkpointed_iteration.txt").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the first run exited early; see {out / 'first.log'}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_after = time.monotonic() - start
    start = time.monotonic()
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if second.returncode:
        raise RuntimeError(second.stdout[-3000:] + second.stderr[-3000:])
    text = (out / "first.log").read_text() + second.stdout
    steps = metrics(out)
    return {
        "killed_after_s": killed_after,
        "second_run_s": time.monotonic() - start,
        "steps_logged": [s["step"] for s in steps],
        "save_s": seconds(r"saved \S+ in ([\d.]+)s", text),
        "export_s": seconds(r"exported the policy to \S+ in ([\d.]+)s", text),
        "load_s": seconds(r"resumed from \S+ in ([\d.]+)s", text),
        "checkpoint_mb": size_mb(ckpt / "iter_0000002"),
        "policy_mb": size_mb(ckpt / "iter_0000002" / "policy"),
        "hf_mb": size_mb(out / "hf" / "2"),
        "step_s": [s["perf/step_seconds"] for s in steps],
    }


def fault_run(out: Path) -> dict:
    cmd = command(
        out,
        "--num-rollout",
        "2",
        "--rollout-num-engines",
        "2",
        "--use-fault-tolerance",
        "--rollout-health-check-interval",
        "2",
        "--rollout-health-check-timeout",
        "10",
        "--custom-generate-function-path",
        "tests.custom_hooks.sabotage_engines_generate",
    )
    out.mkdir(parents=True)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "run.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    steps = metrics(out)
    return {
        "restarts": [s.get("rollout/engine_restarts") for s in steps],
        "restart_s": [s.get("rollout/engine_restart_seconds") for s in steps],
        "failed": [s["rollout/failed"] for s in steps],
        "samples": [s["rollout/kept_groups"] * 4 for s in steps],
        "rollout_s": [s["rollout/seconds"] for s in steps],
        "logprob_diff": [s["train/logprob_abs_diff_vs_rollout"] for s in steps],
    }


def determinism_cost(out: Path) -> dict:
    rates = {}
    for name, extra in {"default": [], "deterministic": ["--sglang-enable-deterministic-inference"]}.items():
        folder = out / name
        cmd = command(folder, "--num-rollout", "1", "--debug-rollout-only", *extra)
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        (step,) = metrics(folder)
        rates[name] = {"tokens_per_s": step["rollout/tokens_per_s"], "seconds": step["rollout/seconds"]}
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/checkpoint_recovery")
    out = Path(p.parse_args().out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = {
        "resume": resume_run(out / "resume"),
        "faults": fault_run(out / "faults"),
        "determinism": determinism_cost(out / "determinism"),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
