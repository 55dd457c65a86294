"""GRPO with real weights on one GPU: step phases, throughput and held-out accuracy before and after (issue 23, item 4).

Usage (repo root, on the GPU machine): python benchmarks/gpu/real_weights.py MODEL_DIR DATA_DIR OUT_DIR [STEPS]
MODEL_DIR: SmolLM2-135M-Instruct converted by slime.hub.provision.convert_gguf (the GGUF travels in two parts, see
docs/gpu.md). DATA_DIR: a folder of slime-format JSONL files (prompt as chat messages, label), e.g. the MAWPS split
of the shared data. All rows are pooled and shuffled (seed 0); HELD_OUT of them are the evaluation set, never trained
on. Runs `slime.train` in the default shared layout (engine and trainer on the one GPU as separate processes) and
writes OUT_DIR/real_weights.json: per-step phases and throughput from metrics.jsonl, greedy held-out accuracy before
and after. Exits non-zero when accuracy did not rise or a run step failed.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
HELD_OUT = 256
KEEP = (
    "rollout/reward_mean", "rollout/response_len_mean", "rollout/tokens", "rollout/tokens_per_s",
    "rollout/group_seconds_last_over_mean", "perf/rollout_seconds", "train/seconds", "train/tokens_per_s",
    "perf/token_budget", "sync/seconds", "sync/gather_seconds", "sync/send_seconds", "perf/step_seconds",
    "train/logprob_abs_diff_vs_rollout",
)  # fmt: skip


def split(data_dir: str, work: str) -> tuple[str, str, int]:
    rows = []
    for path in sorted(Path(data_dir).glob("*.jsonl")):
        rows += [line for line in path.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    train, held = rows[HELD_OUT:], rows[:HELD_OUT]
    Path(work, "train.jsonl").write_text("\n".join(train) + "\n")
    Path(work, "held_out.jsonl").write_text("\n".join(held) + "\n")
    return os.path.join(work, "train.jsonl"), os.path.join(work, "held_out.jsonl"), len(train)


def grpo_flags(
    model: str, prompt_data: str, run_dir: str, prompts: int, max_len: int, steps: int, lr: str
) -> list[str]:
    """GRPO on chat-formatted math word problems graded by math-verify: `prompts` x 8 samples of <= `max_len` new
    tokens per step at temperature 1, one optimizer step per rollout, the layout slime picks for the machine."""
    return [
        "--hf-checkpoint", model, "--prompt-data", prompt_data, "--input-key", "prompt", "--label-key", "label",
        "--apply-chat-template", "--rollout-shuffle", "--rm-type", "math", "--rollout-batch-size", str(prompts),
        "--n-samples-per-prompt", "8", "--rollout-max-response-len", str(max_len), "--rollout-temperature", "1.0",
        "--num-rollout", str(steps), "--global-batch-size", str(prompts * 8), "--lr", lr, "--use-dynamic-batch-size",
        "--output-dir", run_dir,
    ]  # fmt: skip


def main() -> None:
    import ray

    from benchmarks.gpu.run import finish
    from slime.train import settled_args, train

    model, data_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 12
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="real-weights-")
    train_path, held_path, n_train = split(data_dir, work)
    run_dir = os.path.join(work, "run")
    flags = grpo_flags(model, train_path, run_dir, 64, 384, steps, "1e-5") + [
        "--eval-prompt-data", "held_out", held_path, "--eval-interval", str(steps), "--eval-temperature", "0",
        "--eval-max-response-len", "384",
    ]  # fmt: skip
    start = time.monotonic()
    try:
        result = train(settled_args(flags))
    finally:
        ray.shutdown()
    key = "eval/held_out/reward_mean"
    before, after = result.get("eval_before", {}).get(key), result.get("eval", {}).get(key)
    metrics = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "model": model,
        "train_rows": n_train,
        "held_out_rows": HELD_OUT,
        "flags": flags,
        "held_out_accuracy_before": before,
        "held_out_accuracy_after": after,
        "wall_seconds": time.monotonic() - start,
        "steps": [{k: s.get(k) for k in KEEP if k in s} for s in metrics if "rollout/tokens" in s],
    }
    checks = [] if before is not None and after is not None and after > before else [f"accuracy {before} -> {after}"]
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=1))
    for s in report["steps"]:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()})
    finish(report, Path(out, "real_weights.json"), checks)


if __name__ == "__main__":
    main()
