"""Weight sync over CUDA IPC on one GPU: milliseconds per GB, and where they go (issue 23, item 3).

Usage (repo root, on the GPU machine): python benchmarks/gpu/sync.py TOKENIZER_DIR OUT_DIR [--models a,b]
Random-weight Qwen3-0.6B and SmolLM2-135M shapes (benchmarks/gpu/run.py). Per model: a bf16 engine on the GPU, a
one-rank FSDP2 trainer sharing it (Ray, as in the loop), one training step, then SYNCS tensor-mode syncs in a row
(the first pays for opening the engine's HTTP session and the IPC mappings; later ones are the steady state). Each
sync reports its total, gather (full tensors, cast to bf16) and send (buckets handed to the engine, copied there)
seconds, and the engine's own seconds checking and copying the weights in (its weight_update_seconds). After the
last sync the engine's log-probs must match the trainer's within bf16 tolerance.
Writes OUT_DIR/sync_benchmark.json; exits non-zero when the steady state is above MS_PER_GB_TARGET ms/GB for the 0.6B
shape or the log-probs disagree.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu.run import MODELS, build_model, finish, logprob_gaps, synthetic_rollout, train_args  # noqa: E402
from slime.engine.launch import launch_engine  # noqa: E402
from slime.ray.train_group import TrainGroup  # noqa: E402
from slime.utils.http_utils import request_sync  # noqa: E402
from tests.trainer.test_training import _generate  # noqa: E402

SYNCS = 5
MS_PER_GB_TARGET = 30.0


def engine_stats(url: str) -> dict:
    return json.loads(request_sync("GET", f"{url}/server_info")[1])["internal_states"][0]


def measure(name: str, path: str, work: str) -> dict:
    engine = launch_engine(
        path, os.path.join(work, "logs"), index=0, dtype="bfloat16", device="cuda", mem_fraction_static=0.3
    )
    group = TrainGroup(train_args(path, work, "tensor"))
    try:
        group.call("connect_engines", [engine.url])
        group.train(0, ray.put(synthetic_rollout(MODELS[name]["vocab_size"])))
        syncs = []
        for i in range(SYNCS):
            engine_before = engine_stats(engine.url)["weight_update_seconds"]
            m = group.update_weights(f"tensor-{i + 1}")
            engine_seconds = engine_stats(engine.url)["weight_update_seconds"] - engine_before
            gb = m["sync/bytes"] / 1e9
            syncs.append(
                {
                    "seconds": m["sync/seconds"],
                    "gather_seconds": m["sync/gather_seconds"],
                    "send_seconds": m["sync/send_seconds"],
                    "engine_load_seconds": engine_seconds,
                    "gb": gb,
                    "ms_per_gb": 1e3 * m["sync/seconds"] / gb,
                }
            )
            print(name, i, json.dumps(syncs[-1]), flush=True)
        fresh, version = _generate(engine.url, 16, seed=2)
        gaps = logprob_gaps(fresh, group.call("log_probs", fresh)[0])
        steady = min(syncs[1:], key=lambda s: s["seconds"])
        return {
            "syncs": syncs,
            "steady_ms_per_gb": steady["ms_per_gb"],
            "engine_version": version,
            "logprob_max_diff_after_sync": max(gaps),
            "logprob_mean_diff_after_sync": sum(gaps) / len(gaps),
        }
    finally:
        group.shutdown()
        engine.stop()


def main() -> None:
    tokenizer_dir, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d")}
    ray.init(num_gpus=torch.cuda.device_count(), num_cpus=os.cpu_count(), include_dashboard=False)
    work = tempfile.mkdtemp(prefix="sync-bench-")
    checks = []
    names = sys.argv[sys.argv.index("--models") + 1].split(",") if "--models" in sys.argv else list(MODELS)
    for name in names:
        try:
            r = results[name] = measure(name, build_model(name, tokenizer_dir, os.path.join(work, name)), work)
            if r["logprob_mean_diff_after_sync"] > 0.05 or r["engine_version"] != f"tensor-{SYNCS}":
                checks.append(f"{name}: engine disagrees after the sync: {r}")
        except Exception as exc:  # noqa: BLE001 - record it, measure the rest
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            checks.append(f"{name}: {results[name]['error'][:200]}")
        Path(out, "sync_benchmark.json").write_text(json.dumps(results, indent=1))
    steady = results.get("qwen3-0.6b", {}).get("steady_ms_per_gb")
    if steady is not None and steady > MS_PER_GB_TARGET:
        checks.append(f"qwen3-0.6b: {steady:.0f} ms/GB > {MS_PER_GB_TARGET:.0f}")
    ray.shutdown()
    finish(results, Path(out, "sync_benchmark.json"), checks)


if __name__ == "__main__":
    main()
