"""The README demo: GRPO on the embedded SmolLM2-135M-Instruct with built-in arithmetic problems, on CPU.

Prints held-out accuracy on the built-in test split before and after training. Extra command-line flags are
appended to the demo's own, so any of them can be overridden (e.g. `--num-rollout 5`).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import ray

from slime.train import settled_args, train

DEMO_FLAGS = [
    "--hf-checkpoint",
    "SmolLM2-135M-Instruct",
    "--prompt-data",
    "builtin:arithmetic:train:1000:0",
    "--input-key",
    "prompt",
    "--label-key",
    "label",
    "--apply-chat-template",
    "--rollout-shuffle",
    "--rm-type",
    "math",
    "--rollout-batch-size",
    "8",
    "--n-samples-per-prompt",
    "4",
    "--rollout-max-response-len",
    "48",
    "--rollout-temperature",
    "0.8",
    "--num-rollout",
    "10",
    "--eval-interval",
    "10",
    "--lr",
    "3e-5",
    "--use-rollout-logprobs",
    "--use-dynamic-batch-size",
    "--max-tokens-per-gpu",
    "2048",
    "--eval-prompt-data",
    "arithmetic_test",
    "builtin:arithmetic:test:64:0",
    "--eval-temperature",
    "0",
    "--output-dir",
    "outputs/demo",
    "--overwrite-output-dir",  # each demo run replaces the last one's metrics
]


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "WARNING"), format="%(asctime)s %(name)s %(message)s")
    start = time.monotonic()
    print("preparing the embedded model (converted once, then cached) …", flush=True)
    args = settled_args(DEMO_FLAGS + list(sys.argv[1:] if argv is None else argv))
    try:
        result = train(args)
    finally:
        ray.shutdown()
    key = "eval/arithmetic_test/reward_mean"
    before, after = result.get("eval_before", {}).get(key), result.get("eval", {}).get(key)
    print("\n=== demo summary ===")
    if before is not None and after is not None:
        print(
            f"held-out accuracy (64 built-in test problems, greedy): {before:.1%} before -> {after:.1%} after "
            f"{args.num_rollout} GRPO steps"
        )
    if "rollout" in result:
        r = result["rollout"]
        print(
            f"last rollout: reward mean {r['rollout/reward_mean']:.3f}, response length "
            f"{r['rollout/response_len_mean']:.0f} tokens"
        )
    print(
        f"wall time {time.monotonic() - start:.0f}s (seed {args.seed}); metrics in {args.output_dir}/metrics.jsonl, "
        f"TensorBoard in {args.output_dir}/tensorboard"
    )
    print(f"report (open in a browser): {os.path.abspath(os.path.join(args.output_dir, 'report.html'))}")


if __name__ == "__main__":
    main()
