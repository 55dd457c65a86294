"""Learning parity of the synchronous loop, one-step overlap (--async) and fully asynchronous rollouts (issue 24):
held-out accuracy after the same number of samples, several seeds per mode, in one device call.

Usage (repo root, on the GPU machine): python benchmarks/gpu/async_parity.py MODEL_DIR OUT_DIR [STEPS] [SEEDS] [MODES]
MODEL_DIR: real weights (SmolLM2-135M-Instruct converted by slime.hub.provision.convert_gguf). The task is the
built-in arithmetic word problems (the README demo's, where this model learns within a few steps; the MAWPS split
stays near 2 % for a model this small): 32 prompts x 8 samples of <= 128 tokens per step, STEPS steps (default 20),
greedy accuracy on 256 built-in test problems before and after. SEEDS: comma-separated (default 1,2); MODES:
comma-separated names from async_loop.MODES (default all; the comparison with sync needs sync among them).
Writes OUT_DIR/async_parity.json after every run; exits non-zero when a run fails, a run does not improve on the
starting accuracy, or a mode's mean final accuracy is below the synchronous mean by more than TOLERANCE or the
synchronous runs' own seed-to-seed spread, whichever is larger.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu.async_loop import MODES  # noqa: E402
from benchmarks.gpu.real_weights import grpo_flags  # noqa: E402
from benchmarks.gpu.run import finish  # noqa: E402

TOLERANCE = 0.05
KEY = "eval/held_out/reward_mean"


def main() -> None:
    import ray

    from slime.train import settled_args, train

    model, out = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    seeds = [int(s) for s in (sys.argv[4] if len(sys.argv) > 4 else "1,2").split(",")]
    modes = {m: MODES[m] for m in (sys.argv[5].split(",") if len(sys.argv) > 5 else MODES)}
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="async-parity-")
    results: dict = {"date": time.strftime("%Y-%m-%d"), "model": model, "steps": steps, "seeds": seeds, "runs": []}
    checks = []
    for seed in seeds:
        for mode, extra in modes.items():
            run_dir = os.path.join(work, f"{mode}-{seed}")
            flags = grpo_flags(model, "builtin:arithmetic:train:4000:0", run_dir, 32, 128, steps, "3e-5") + [
                "--eval-prompt-data", "held_out", "builtin:arithmetic:test:256:0", "--eval-interval", str(steps),
                "--eval-temperature", "0", "--seed", str(seed),
            ] + extra  # fmt: skip
            start = time.monotonic()
            run = {"mode": mode, "seed": seed}
            try:
                result = train(settled_args(flags))
                metrics = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
                run |= {
                    "before": result.get("eval_before", {}).get(KEY),
                    "after": result.get("eval", {}).get(KEY),
                    "wall_seconds": time.monotonic() - start,
                    "reward_per_step": [m["rollout/reward_mean"] for m in metrics if "rollout/reward_mean" in m],
                    "staleness_per_step": [m["train/staleness_mean"] for m in metrics if "train/staleness_mean" in m],
                }
                if run["before"] is None or run["after"] is None or run["after"] <= run["before"]:
                    checks.append(f"{mode} seed {seed}: accuracy {run['before']} -> {run['after']}")
            except Exception as exc:  # noqa: BLE001 - record it, run the rest
                run["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                checks.append(f"{mode} seed {seed}: {run['error'][:200]}")
            finally:
                ray.shutdown()
            results["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "reward_per_step"}), flush=True)
            Path(out, "async_parity.json").write_text(json.dumps(results, indent=1))
    finals = {
        mode: [r["after"] for r in results["runs"] if r["mode"] == mode and r.get("after") is not None]
        for mode in modes
    }
    results["mean_after"] = {m: sum(v) / len(v) for m, v in finals.items() if v}
    sync = finals.get("sync", [])
    if sync:
        spread = max(sync) - min(sync)
        results["sync_seed_spread"] = spread
        for mode in modes:
            mean = results["mean_after"].get(mode)
            if mode != "sync" and mean is not None and mean < results["mean_after"]["sync"] - max(TOLERANCE, spread):
                checks.append(f"{mode}: mean accuracy {mean:.3f} < sync {results['mean_after']['sync']:.3f} - margin")
    finish(results, Path(out, "async_parity.json"), checks)


if __name__ == "__main__":
    main()
