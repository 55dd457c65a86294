"""Issue 23's GPU targets in one device call: each figure measured in this call, against its threshold.

Usage (repo root, on the GPU machine): python benchmarks/gpu/targets.py TOKENIZER_DIR OUT_DIR [--deadline SECONDS]
Runs, one after the other (each alone on the GPU, as its own process, its JSON and log under OUT_DIR/<part>/):
- loop: benchmarks/gpu/loop.py, in-loop rollout throughput over the engine alone, 512 x 384 and 1,024 x 1,024;
- trainer: benchmarks/gpu/trainer.py, one rollout's training of the Qwen3-0.6B shape with `--train-compile`'s
  configuration, MFU against the bf16 matmul peak measured in the call;
- colocated: benchmarks/gpu/run.py --grpo-only, GRPO steps of the Qwen3-0.6B shape colocated with its engine,
  the trainer's offload + onload and the weight sync in the loop (steps after the first);
- sync: benchmarks/gpu/sync.py, the steady-state weight sync over CUDA IPC, ms per GB.
A part that would not finish before the deadline (default 560 s from the start) is cut and reported as such.
Writes OUT_DIR/targets.json (every figure, its target and whether it was met, plus each part's own results) and
exits non-zero when a target is missed or a part failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {  # figure: (threshold, "min" = at least / "max" = at most)
    "loop_ratio_512x384": (0.8, "min"),
    "loop_ratio_1024x1024": (0.8, "min"),
    "trainer_mfu_qwen3_0.6b": (0.35, "min"),
    "colocated_offload_onload_s": (0.3, "max"),
    "sync_ms_per_gb": (30.0, "max"),
}


def parts(tok: str, out: Path) -> list[tuple[str, list[str], str]]:
    """(name, command, results file) in the order they run: the slowest and least certain first."""
    py = sys.executable
    return [
        ("loop", [py, str(HERE / "loop.py"), tok, str(out / "loop")], "loop_benchmark.json"),
        (
            "trainer",
            [
                py,
                str(HERE / "trainer.py"),
                tok,
                str(out / "trainer"),
                "--models",
                "qwen3-0.6b",
                "--configs",
                "compiled pointwise",
            ],
            "trainer_benchmark.json",
        ),  # fmt: skip
        (
            "colocated",
            [
                py,
                str(HERE / "run.py"),
                tok,
                str(out / "colocated"),
                "--grpo-only",
                "--grpo-models",
                "qwen3-0.6b",
                "--steps",
                "3",
            ],
            "gpu_benchmark.json",
        ),  # fmt: skip
        ("sync", [py, str(HERE / "sync.py"), tok, str(out / "sync"), "--models", "qwen3-0.6b"], "sync_benchmark.json"),
    ]


def figures(results: dict) -> dict[str, float]:
    """The targeted figures from the parts' results (absent when a part did not measure it)."""
    got: dict[str, float] = {}
    loop = results.get("loop", {})
    for key in ("512x384", "1024x1024"):
        if "ratio" in loop.get(key, {}):
            got[f"loop_ratio_{key}"] = loop[key]["ratio"]
    mfu = results.get("trainer", {}).get("qwen3-0.6b", {}).get("best_mfu")
    if mfu is not None:
        got["trainer_mfu_qwen3_0.6b"] = mfu
    steps = results.get("colocated", {}).get("qwen3-0.6b/grpo", {}).get("steps", [])[1:]  # the first step compiles
    if steps:
        got["colocated_offload_onload_s"] = min(s["perf/offload_seconds"] + s["perf/onload_seconds"] for s in steps)
        got["colocated_offload_onload_s_worst"] = max(
            s["perf/offload_seconds"] + s["perf/onload_seconds"] for s in steps
        )
        got["colocated_sync_ms_per_gb"] = min(1e12 * s["sync/seconds"] / s["sync/bytes"] for s in steps)
    sync = results.get("sync", {}).get("qwen3-0.6b", {}).get("steady_ms_per_gb")
    if sync is not None:
        got["sync_ms_per_gb"] = sync
    return got


def main() -> None:
    tok, out = sys.argv[1], Path(sys.argv[2])
    deadline = time.monotonic() + (
        float(sys.argv[sys.argv.index("--deadline") + 1]) if "--deadline" in sys.argv else 560
    )
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    summary: dict = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip() or None, "parts": {}}
    results: dict = {}
    for name, command, file in parts(tok, out):
        left = deadline - time.monotonic()
        record = summary["parts"][name] = {"command": " ".join(command[1:])}
        if left < 30:
            record["status"] = "not run: the deadline came first"
            continue
        (out / name).mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(out / name / "log.txt", "w") as log:
            try:
                rc = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, timeout=left, env=os.environ
                ).returncode
                record["status"] = f"exit {rc}"
            except subprocess.TimeoutExpired:
                record["status"] = f"cut at the deadline after {left:.0f} s"
        record["seconds"] = round(time.monotonic() - start, 1)
        path = out / name / file
        results[name] = json.loads(path.read_text()) if path.exists() else {}
        record["failed_checks"] = results[name].get("failed_checks")
        print(f"[{record['seconds']:6.1f}s] {name}: {record['status']}, checks {record['failed_checks']}", flush=True)
        (out / "targets.json").write_text(json.dumps(summary | {"results": results}, indent=1))
    got = figures(results)
    summary["figures"] = got
    missed = []
    for key, (threshold, kind) in TARGETS.items():
        value = got.get(key)
        met = value is not None and (value >= threshold if kind == "min" else value <= threshold)
        summary.setdefault("targets", {})[key] = {"value": value, "threshold": threshold, "kind": kind, "met": met}
        if not met:
            missed.append(f"{key}: {value} ({'at least' if kind == 'min' else 'at most'} {threshold})")
    summary["missed"] = missed
    summary["failed_parts"] = [n for n, r in summary["parts"].items() if r.get("status") != "exit 0"]
    (out / "targets.json").write_text(json.dumps(summary | {"results": results}, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "parts"}, indent=1))
    sys.exit(1 if missed or summary["failed_parts"] else 0)


if __name__ == "__main__":
    main()
