"""Synchronous vs one-step overlap (--async) vs fully asynchronous rollouts: samples per second in one device call
(issue 24).

Usage (repo root, on the GPU machine): python benchmarks/gpu/async_loop.py MODEL_DIR DATA_DIR OUT_DIR [STEPS]
MODEL_DIR: real weights (SmolLM2-135M-Instruct converted by slime.hub.provision.convert_gguf); DATA_DIR: slime-format
JSONL files (the MAWPS split of the shared data). One GPU, engine and trainer sharing it as separate processes,
32 prompts x 8 samples, <= 256 new tokens (the configuration where rollout and training take similar time).
Samples per second = trained samples over the wall time of steps 2..STEPS-2: the first steps pay for warm-up, and
the last one has no next rollout to overlap with.
Writes OUT_DIR/async_benchmark.json; exits non-zero when --async is below ONE_STEP_TARGET x the synchronous loop or
the fully asynchronous rollout below FULLY_TARGET x.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu.real_weights import grpo_flags, split  # noqa: E402
from benchmarks.gpu.run import finish  # noqa: E402

ONE_STEP_TARGET, FULLY_TARGET = 1.4, 1.6
MODES = {
    "sync": [],
    "one_step": ["--async"],
    "fully_async": [
        "--rollout-function-path", "slime.rollout.fully_async_rollout.generate_rollout_fully_async",
        "--partial-rollout", "--max-staleness", "2", "--weight-sync-pause-mode", "in_place",
    ],
}  # fmt: skip
KEEP = (
    "perf/step_seconds", "perf/samples_per_s", "perf/rollout_seconds", "train/seconds", "sync/seconds",
    "perf/trainer_idle_seconds", "perf/engine_idle_seconds", "perf/overlap_ratio", "train/staleness_mean",
    "train/staleness_max", "rollout/stale_dropped_groups", "rollout/reward_mean", "rollout/response_len_mean",
)  # fmt: skip


def main() -> None:
    import ray

    from slime.train import settled_args, train

    model, data_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="async-bench-")
    train_path, _, _ = split(data_dir, work)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "model": model, "steps": steps}
    for mode, extra in MODES.items():
        run_dir = os.path.join(work, mode)
        flags = grpo_flags(model, train_path, run_dir, 32, 256, steps, "1e-6") + extra
        start = time.monotonic()
        try:
            train(settled_args(flags))
            metrics = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
            metrics = [m for m in metrics if "perf/step_seconds" in m]
            timed = metrics[2:-1]
            results[mode] = {
                "samples_per_s": 256 * len(timed) / sum(m["perf/step_seconds"] for m in timed),
                "wall_seconds": time.monotonic() - start,
                "steps": [{k: m.get(k) for k in KEEP if k in m} for m in metrics],
            }
        except Exception as exc:  # noqa: BLE001 - record it, measure the rest
            results[mode] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        finally:
            ray.shutdown()
        print(mode, json.dumps(results[mode])[:600], flush=True)
        Path(out, "async_benchmark.json").write_text(json.dumps(results, indent=1))
    checks = []
    base = results.get("sync", {}).get("samples_per_s")
    for mode, target in (("one_step", ONE_STEP_TARGET), ("fully_async", FULLY_TARGET)):
        rate = results.get(mode, {}).get("samples_per_s")
        if base and rate:
            results[mode]["speedup_vs_sync"] = rate / base
            if rate / base < target:
                checks.append(f"{mode}: {rate / base:.2f} x sync < {target}")
        else:
            checks.append(f"{mode}: not measured ({results.get(mode, {}).get('error', 'no sync baseline')[:200]})")
    finish(results, Path(out, "async_benchmark.json"), checks)


if __name__ == "__main__":
    main()
