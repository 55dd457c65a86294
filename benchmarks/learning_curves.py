"""Learning curves of several advantage estimators on the demo task: SmolLM2-135M-Instruct, built-in arithmetic,
same seed, data, sampling and policy learning rate; only the algorithm flags differ.

Usage: .venv/bin/python benchmarks/learning_curves.py [--estimators grpo gspo reinforce_plus_plus ppo]
       [--num-rollout 8] [--out outputs/learning_curves]
Writes OUT/NAME/metrics.jsonl per estimator and OUT/summary.json, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from slime.config.arguments import parse_args
from slime.demo import DEMO_FLAGS
from slime.train import train

ALGORITHM_FLAGS = {
    "grpo": [],
    "gspo": ["--advantage-estimator", "gspo", "--eps-clip", "3e-4", "--eps-clip-high", "4e-4"],
    "reinforce_plus_plus": ["--advantage-estimator", "reinforce_plus_plus"],
    "reinforce_plus_plus_baseline": ["--advantage-estimator", "reinforce_plus_plus_baseline"],
    "ppo": ["--advantage-estimator", "ppo", "--critic-lr", "1e-4", "--normalize-advantages"],
}
EVAL_KEY = "eval/arithmetic_test/reward_mean"


def run(name: str, num_rollout: int, out_dir: str) -> dict:
    flags = [
        *DEMO_FLAGS,
        "--num-rollout",
        str(num_rollout),
        "--eval-interval",
        str(num_rollout),
        "--output-dir",
        os.path.join(out_dir, name),
        *ALGORITHM_FLAGS[name],
    ]
    args = parse_args(flags, resolve_model=True)
    start = time.monotonic()
    result = train(args)
    seconds = time.monotonic() - start
    steps = [json.loads(line) for line in open(os.path.join(out_dir, name, "metrics.jsonl"))]
    rewards = [s["rollout/reward_mean"] for s in steps if "rollout/reward_mean" in s]
    return {
        "estimator": name,
        "eval_before": result.get("eval_before", {}).get(EVAL_KEY),
        "eval_after": result.get("eval", {}).get(EVAL_KEY),
        "train_reward_per_rollout": rewards,
        "seconds": seconds,
        "seconds_per_step": [s["perf/step_seconds"] for s in steps if "perf/step_seconds" in s],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| estimator | held-out before | held-out after | train reward, first 2 → last 2 rollouts | s/step | total s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rw, steps = r["train_reward_per_rollout"], r["seconds_per_step"]
        first, last = sum(rw[:2]) / len(rw[:2]), sum(rw[-2:]) / len(rw[-2:])
        lines.append(
            f"| {r['estimator']} | {r['eval_before']:.1%} | {r['eval_after']:.1%} | {first:.3f} → "
            f"{last:.3f} | {sum(steps) / len(steps):.0f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--estimators",
        nargs="+",
        default=["grpo", "gspo", "reinforce_plus_plus", "ppo"],
        choices=sorted(ALGORITHM_FLAGS),
        help="which algorithms to run, in order",
    )
    p.add_argument("--num-rollout", type=int, default=8, help="rollout steps per estimator")
    p.add_argument("--out", default="outputs/learning_curves", help="output folder")
    opts = p.parse_args()
    rows = []
    for name in opts.estimators:
        rows.append(run(name, opts.num_rollout, opts.out))
        with open(os.path.join(opts.out, "summary.json"), "w") as f:
            json.dump(rows, f, indent=1)
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
