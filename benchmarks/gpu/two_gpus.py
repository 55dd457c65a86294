"""Two GPUs of one host (issue 30): an engine on a GPU of its own with NCCL weight sync, the asynchronous modes on
that layout against the one-GPU shared layout, and FSDP2 over two ranks against one.

Usage (repo root, on a machine of the nvidia-h200-x2 kind):
    python benchmarks/gpu/two_gpus.py MODEL_DIR DATA_DIR OUT_DIR [--steps 20] [--async-steps 8] [--parts layouts,fsdp]
    [--smoke] (a few tiny steps, for trying the script on CPU: engines on CPU, weight sync by gloo)
MODEL_DIR: real weights (SmolLM2-135M-Instruct converted by slime.hub.provision.convert_gguf, carried as in
benchmarks/gpu/real_weights.py); DATA_DIR: slime-format JSONL files (the MAWPS split of the shared data).

Parts:
- layouts: `python -m slime.train` runs, each its own process and Ray cluster, 32 prompts x 8 samples, <= 256 new
  tokens: the one-GPU shared layout (only the first GPU visible) synchronous; then trainer on GPU 0 and the engine on
  GPU 1 (`--rollout-num-gpus 1`, NCCL broadcast sync) synchronous for --steps steps, one-step async (`--async`) and
  fully async for --async-steps. Per run: samples/s of the steady steps (after two, before the last), and per step
  the sync's seconds and GB/s, the engine-vs-trainer log-prob gap and the rollout's weight version.
- fsdp: one rollout's training of MODEL_DIR (fp32 compute, so the comparison is not lost in bf16 rounding) on one
  rank and on two: the same loss and gradient norm within PARITY_RTOL; a checkpoint written on two ranks, loaded on
  one: the same log-probs.
Writes OUT_DIR/two_gpus.json after every run; exits non-zero when a check fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu.async_loop import MODES as ASYNC_FLAGS  # noqa: E402
from benchmarks.gpu.real_weights import grpo_flags, split  # noqa: E402
from benchmarks.gpu.run import finish  # noqa: E402

PARITY_RTOL = 1e-3  # fp32 compute: two ranks reduce in another order than one
GAP_MEAN_MAX = 0.05  # engine (bf16) vs trainer log-prob per token, after each sync
KEEP = (
    "perf/step_seconds", "perf/rollout_seconds", "train/seconds", "sync/seconds", "sync/bytes",
    "train/logprob_abs_diff_vs_rollout", "rollout/weight_version", "train/staleness_max", "rollout/reward_mean",
)  # fmt: skip


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def train_run(flags: list[str], run_dir: str, env: dict, samples_per_step: int, timeout: float) -> dict:
    """`python -m slime.train FLAGS` in its own process; the steps' metrics and samples/s of the steady ones."""
    start = time.monotonic()
    log = Path(run_dir + ".log")
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "slime.train", *flags], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout
        ).returncode
    if rc:
        raise RuntimeError(f"slime.train exited {rc}: {log.read_text(errors='replace')[-1500:]}")
    steps = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [s for s in steps if "perf/step_seconds" in s]
    steady = steps[2:-1] or steps
    out = {
        "wall_seconds": time.monotonic() - start,
        "samples_per_s": samples_per_step * len(steady) / sum(s["perf/step_seconds"] for s in steady),
        "steps": [{k: s[k] for k in KEEP if k in s} for s in steps],
    }
    syncs = [s for s in steps if s.get("sync/seconds")]
    if syncs:
        out["sync_gb_per_s"] = [s["sync/bytes"] / 1e9 / s["sync/seconds"] for s in syncs]
    return out


def layouts(model: str, data_dir: str, work: str, smoke: bool) -> tuple[dict, list[str]]:
    train_path, _, _ = split(data_dir, work)
    prompts, new = (2, 8) if smoke else (32, 256)
    steps, async_steps = (3, 3) if smoke else (int(option("--steps", "20")), int(option("--async-steps", "8")))
    # on CPU (--smoke) the engine runs on CPU whatever the flags say; the distributed sync goes over gloo
    apart = ["--update-weight-mode", "distributed"] if smoke else ["--rollout-num-gpus", "1"]
    first_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    runs = {  # name: (extra flags, steps, environment)
        "shared_one_gpu_sync": ([], async_steps, first_gpu),
        "two_gpus_sync": (apart, steps, dict(os.environ)),
        "two_gpus_one_step": (apart + ASYNC_FLAGS["one_step"], async_steps, dict(os.environ)),
        "two_gpus_fully_async": (apart + ASYNC_FLAGS["fully_async"], async_steps, dict(os.environ)),
    }
    if smoke:
        runs["shared_one_gpu_sync"] = ([], async_steps, dict(os.environ))
    results, checks = {}, []
    for name, (extra, n, env) in runs.items():
        run_dir = os.path.join(work, name)
        flags = grpo_flags(model, train_path, run_dir, prompts, new, n, "1e-6") + extra
        if smoke:
            flags += ["--n-samples-per-prompt", "2", "--global-batch-size", str(prompts * 2)]
        try:
            r = results[name] = train_run(flags, run_dir, env, prompts * (2 if smoke else 8), 900)
        except Exception as exc:  # noqa: BLE001 - record it, run the rest
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2500]}
            checks.append(f"{name}: {results[name]['error'][:300]}")
            continue
        for i, s in enumerate(r["steps"]):
            gap = s.get("train/logprob_abs_diff_vs_rollout")
            if gap is not None and gap > GAP_MEAN_MAX and "async" not in name and "one_step" not in name:
                checks.append(f"{name} step {i}: engine-trainer log-prob gap {gap:.3f} > {GAP_MEAN_MAX}")
            if name.endswith("_sync") and s.get("rollout/weight_version") != i:
                checks.append(
                    f"{name} step {i}: rollout generated with weight version {s.get('rollout/weight_version')}"
                )
        print(name, json.dumps({k: v for k, v in r.items() if k != "steps"}), flush=True)
    base = results.get("two_gpus_sync", {}).get("samples_per_s")
    shared = results.get("shared_one_gpu_sync", {}).get("samples_per_s")
    for name in ("two_gpus_one_step", "two_gpus_fully_async"):
        rate = results.get(name, {}).get("samples_per_s")
        if rate and base:
            results[name]["vs_two_gpus_sync"] = rate / base
        if rate and shared:
            results[name]["vs_shared_one_gpu"] = rate / shared
    return results, checks


def save_and_reload(trained, make_loader, later, save: Path) -> tuple[dict, float]:
    """Save `trained` (a TrainGroup; shut down here), load the checkpoint into the group `make_loader()` builds:
    the load's answer and the largest difference of their log-probs on `later`."""
    from slime.trainer import checkpoint
    from tests.trainer.test_checkpoint import save_trainer_checkpoint

    try:
        save_trainer_checkpoint(trained, save, 0)
        before = [x for lp in trained.call("log_probs", later)[0] for x in lp]
    finally:
        trained.shutdown()
    loader = make_loader()
    try:
        info = loader.call("load", str(checkpoint.latest(save)[1]))[0]
        after = [x for lp in loader.call("log_probs", later)[0] for x in lp]
    finally:
        loader.shutdown()
    return info, max(abs(a - b) for a, b in zip(before, after, strict=True))


def run_parts(jobs: dict, parts: list[str], results: dict, path: Path) -> list[str]:
    """results[name], failed checks = job() for each job named in `parts` (one that raises is recorded and the rest
    still run); the results rewritten to `path` after each. Returns every failed check."""
    checks: list[str] = []
    for name, job in jobs.items():
        if name not in parts:
            continue
        try:
            results[name], failed = job()
            checks += failed
        except Exception as exc:  # noqa: BLE001 - record it, run the rest
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2500]}
            checks.append(f"{name}: {results[name]['error'][:300]}")
        path.write_text(json.dumps(results, indent=1))
    return checks


def fsdp(model: str, work: str, smoke: bool) -> tuple[dict, list[str]]:
    import torch

    from slime.config.arguments import parse_args
    from slime.ray.train_group import TrainGroup
    from slime.train import start_ray
    from tests.trainer.test_training import _synthetic_batch

    start_ray()
    gpus = 0 if smoke else torch.cuda.device_count()

    def group(ranks: int) -> TrainGroup:
        flags = [
            "--hf-checkpoint", model, "--prompt-data", "builtin:arithmetic", "--rm-type", "math", "--output-dir",
            os.path.join(work, f"fsdp{ranks}"), "--rollout-batch-size", "8", "--n-samples-per-prompt", "4",
            "--global-batch-size", "16", "--lr", "1e-5", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "2048",
            "--train-compute-dtype", "float32", "--actor-num-gpus-per-node", str(ranks),
        ]  # fmt: skip
        return TrainGroup(parse_args(flags, cluster_gpus=gpus))

    data, later = _synthetic_batch(32, seed=1), _synthetic_batch(32, seed=2)
    save = Path(work, "ckpt")
    one = group(1)
    try:
        m_one = one.train(0, data)
    finally:
        one.shutdown()
    two = group(2)
    try:
        m_two = two.train(0, data)
    except BaseException:
        two.shutdown()
        raise
    info, diff = save_and_reload(two, lambda: group(1), later, save)
    keys = ("train/loss", "train/pg_loss", "train/grad_norm")
    out = {
        "one_rank": {k: m_one.get(k) for k in keys},
        "two_ranks": {k: m_two.get(k) for k in keys},
        "checkpoint_load": info,
        "loaded_logprob_max_diff": diff,
    }
    checks = []
    for k in keys:
        a, b = m_one.get(k), m_two.get(k)
        if a is None or b is None or abs(a - b) > PARITY_RTOL * max(abs(a), 1e-6):
            checks.append(f"fsdp: {k} one rank {a} vs two ranks {b} (rtol {PARITY_RTOL})")
    if info.get("saved_world_size") != 2 or out["loaded_logprob_max_diff"] > 1e-4:
        checks.append(
            f"fsdp: checkpoint of two ranks loaded on one: {info}, log-prob diff {out['loaded_logprob_max_diff']}"
        )
    return out, checks


def main() -> None:
    model, data_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    smoke = "--smoke" in sys.argv
    parts = option("--parts", "layouts,fsdp").split(",")
    out.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="two-gpus-")
    results: dict = {"date": time.strftime("%Y-%m-%d"), "model": model, "smoke": smoke}
    if not smoke:
        import torch

        results["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        if torch.cuda.device_count() < 2:
            finish(results, out / "two_gpus.json", [f"needs two GPUs, sees {torch.cuda.device_count()}"])
    jobs = {"layouts": lambda: layouts(model, data_dir, work, smoke), "fsdp": lambda: fsdp(model, work, smoke)}
    checks = run_parts(jobs, parts, results, out / "two_gpus.json")
    finish(results, out / "two_gpus.json", checks)


if __name__ == "__main__":
    main()
