"""Time one weight sync of the whole model into one engine, per mode (tensor, distributed, disk).

Usage: .venv/bin/python benchmarks/weight_sync.py [--hf-checkpoint SmolLM2-135M-Instruct] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import ray

from slime.config.arguments import parse_args
from slime.engine.launch import launch_engine
from slime.hub.provision import resolve_checkpoint
from slime.ray.train_group import TrainGroup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hf-checkpoint", default="SmolLM2-135M-Instruct")
    p.add_argument("--repeats", type=int, default=3)
    opts = p.parse_args()
    model = resolve_checkpoint(opts.hf_checkpoint)
    out = tempfile.mkdtemp(prefix="slime-sync-bench-")
    ray.init(num_cpus=2, include_dashboard=False)
    engine = launch_engine(model, out, num_threads=2)
    try:
        for mode in ("tensor", "distributed", "disk"):
            args = parse_args(
                [
                    "--hf-checkpoint",
                    model,
                    "--prompt-data",
                    "builtin:arithmetic",
                    "--rm-type",
                    "math",
                    "--update-weight-mode",
                    mode,
                    "--output-dir",
                    out,
                ]
            )
            group = TrainGroup(args)
            try:
                group.call("connect_engines", [engine.url])
                runs = [group.update_weights(f"{mode}-{i}") for i in range(opts.repeats)]
            finally:
                group.shutdown()
            secs = [r["sync/seconds"] for r in runs]
            mib = runs[0]["sync/bytes"] / 2**20
            later = statistics.median(secs[1:] or secs)
            print(f"{mode:12s} {mib:.0f} MiB  first {secs[0]:.2f}s  then median {later:.2f}s")
    finally:
        engine.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
