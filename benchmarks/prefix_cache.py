"""The multi-turn search agent's rollouts (examples/search_r1) with this checkout's engine, and optionally another
commit's, one after the other on this machine: how much prompt the engine computes again each turn.

    .venv/bin/python benchmarks/prefix_cache.py [--base DIR] [--rollouts N] [--out FILE]

`--base DIR`: a copy of another commit's slime/ and examples/ (`git archive BASE slime examples | tar -x -C DIR`),
run first. Each side runs `python -m examples.search_r1.run --debug-rollout-only --num-rollout N` (4 questions x 4
samples, <= 160 tokens, SmolLM2-135M-Instruct fp32, one CPU engine) and reads its metrics.jsonl: per rollout the
seconds, the response tokens, and the engine's counters (`engine/prefill_tokens`: prompt tokens computed,
`engine/prefix_shared_tokens`: prompt tokens taken from the prefix cache). Writes FILE (default
benchmarks/results/prefix_cache_cpu_DATE.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("perf/rollout_seconds", "rollout/response_len_mean", "engine/prefill_tokens", "engine/prefix_shared_tokens")


def run_side(code: Path, rollouts: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="prefix-cache-") as out:
        cmd = [sys.executable, "-m", "examples.search_r1.run", "--debug-rollout-only"]
        cmd += ["--num-rollout", str(rollouts), "--output-dir", out]
        env = dict(os.environ, PYTHONPATH=str(code))
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"{code}: the example failed ({done.returncode}):\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        print(f"{code}: {len(rows)} rollouts in {time.monotonic() - started:.0f} s", flush=True)
        return [{k: row.get(k) for k in KEYS} for row in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, help="a copy of another commit's slime/ and examples/, run first")
    p.add_argument("--rollouts", type=int, default=3, help="rollouts per side")
    default_out = ROOT / f"benchmarks/results/prefix_cache_cpu_{time.strftime('%Y-%m-%d')}.json"
    p.add_argument("--out", type=Path, default=default_out, help="where the JSON results go")
    a = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "commit": commit.stdout.strip(), "cpus": os.cpu_count()}
    if a.base:
        results["base"] = run_side(a.base.resolve(), a.rollouts)
    results["this"] = run_side(ROOT, a.rollouts)
    a.out.write_text(json.dumps(results, indent=1))
    print(f"{'side':6} {'rollout':>7} {'seconds':>8} {'resp len':>8} {'prefill tok':>11} {'shared tok':>10}")
    for side in ("base", "this"):
        for i, r in enumerate(results.get(side, [])):
            cells = [f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k in KEYS]
            print(f"{side:6} {i:>7} {cells[0]:>8} {cells[1]:>8} {cells[2]:>11} {cells[3]:>10}")


if __name__ == "__main__":
    main()
