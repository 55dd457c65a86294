"""Four to eight GPUs of one host (issue 31): the trainer's weak scaling, rollouts from several engines behind the
router, a disaggregated asynchronous run against the colocated synchronous one, and a checkpoint moved from N ranks
to N/2.

Usage (repo root, on a machine of the nvidia-h200-x4 or -x8 kind):
    python benchmarks/gpu/scale.py TOKENIZER_DIR OUT_DIR [--parts trainer,rollouts,layouts,checkpoint]
    [--widths 1,2,4,8] [--models qwen3-0.6b,qwen3-4b] [--data DIR] (slime-format JSONL for the layouts part;
    default the built-in arithmetic problems) [--smoke MODEL_DIR] (tiny sizes on CPU, widths 1,2)
Random-weight models (benchmarks/gpu/run.py builds them; `qwen3-4b` is the Qwen3-4B shape). Parts:
- trainer: per model and width w (FSDP2 over w ranks), one rollout's training of w x 64 RL-shaped samples (prompts
  64-512 tokens, log-normal responses 20-3,600; benchmarks/gpu/trainer.py's batch, the per-GPU batch fixed): tokens/s
  per GPU, MFU against the bf16 matmul peak, efficiency against one GPU. Exactness: the same small batch on w ranks
  gives one rank's loss and gradient norm within PARITY_RTOL (fp32 compute).
- rollouts: 1, 2, 4 engines on GPUs of their own behind one router, 256 prompts x 8 samples x 256 new tokens sent
  through it at once: aggregate tokens/s and how evenly the router spread them (max / min tokens per engine).
- layouts: `slime.train` with engines on half the GPUs and the trainer on the other half, fully asynchronous, against
  the colocated synchronous run on all of them: samples/s of the steady steps.
- checkpoint: trained and saved on the widest width, loaded on half of it: equal log-probs.
Writes OUT_DIR/scale.json after every measurement; exits non-zero when a check fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu.async_loop import MODES as ASYNC_FLAGS  # noqa: E402
from benchmarks.gpu.run import MODELS, bf16_peak, build_model, finish  # noqa: E402
from benchmarks.gpu.two_gpus import run_parts, save_and_reload, train_run  # noqa: E402

PARITY_RTOL = 1e-3
QWEN3_4B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
    tie_word_embeddings=True,
)  # fmt: skip
PER_GPU_SAMPLES = 64


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def trainer_flags(model: str, out: str, ranks: int, samples: int, smoke: bool, *extra: str) -> list[str]:
    return [
        "--hf-checkpoint", model, "--prompt-data", "builtin:arithmetic", "--rm-type", "math", "--output-dir", out,
        "--rollout-batch-size", str(samples // 8), "--n-samples-per-prompt", "8", "--global-batch-size", str(samples),
        "--lr", "1e-6", "--use-dynamic-batch-size", "--actor-num-gpus-per-node", str(ranks),
        *(["--max-tokens-per-gpu", "512"] if smoke else []), *extra,
    ]  # fmt: skip


def group(flags: list[str], gpus: int):
    from slime.config.arguments import parse_args
    from slime.ray.train_group import TrainGroup

    return TrainGroup(parse_args(flags, cluster_gpus=gpus))


def rl_rollout(vocab: int, samples: int, smoke: bool, seed: int = 0):
    from benchmarks.gpu.trainer import rl_batch
    from slime.utils.types import TrainBatch

    tokens, responses = [], []
    for i in range(-(-samples // 128)):  # trainer.py's 128-sample batches, different seeds
        t, r = rl_batch(vocab, seed + i)
        tokens, responses = tokens + t, responses + r
    tokens, responses = tokens[:samples], responses[:samples]
    if smoke:  # toy lengths: two CPU cores
        tokens, responses = [t[:24] for t in tokens], [min(r, 12) for r in responses]
    return TrainBatch(
        tokens=tokens,
        response_lengths=responses,
        loss_masks=[[1] * r for r in responses],
        rewards=[float(i % 2) for i in range(samples)],
    )


def trainer(paths: dict[str, str], widths: list[int], work: str, smoke: bool, gpus: int, peak: float) -> tuple:
    from benchmarks.gpu.trainer import flops
    from slime.train import start_ray
    from tests.trainer.test_training import _synthetic_batch

    start_ray()
    out, checks = {}, []
    for name, path in paths.items():
        vocab = 49152 if smoke else (MODELS.get(name) or QWEN3_4B)["vocab_size"]
        rows = out[name] = {}
        small = _synthetic_batch(32, seed=3)
        for w in widths:
            samples = (8 if smoke else PER_GPU_SAMPLES) * w
            data = rl_rollout(vocab, samples, smoke)
            f = flops(path, data.tokens, data.response_lengths)
            try:
                g = group(trainer_flags(path, os.path.join(work, f"{name}-w{w}"), w, samples, smoke), gpus)
                try:
                    g.train(0, data)  # warm-up: compilation, allocator
                    start = time.perf_counter()
                    g.train(1, data)
                    seconds = time.perf_counter() - start
                finally:
                    g.shutdown()
                exact = group(
                    trainer_flags(
                        path, os.path.join(work, f"{name}-exact-w{w}"), w, 32, smoke, "--train-compute-dtype", "float32"
                    ),
                    gpus,
                )
                try:
                    m = exact.train(0, small)
                finally:
                    exact.shutdown()
                tokens = sum(map(len, data.tokens))
                rows[w] = {
                    "tokens": tokens,
                    "seconds": seconds,
                    "tokens_per_s_per_gpu": tokens / seconds / w,
                    "mfu": f / seconds / (peak * w) if peak else None,
                    "loss_fp32": m["train/loss"],
                    "grad_norm_fp32": m["train/grad_norm"],
                }
            except Exception as exc:  # noqa: BLE001 - record it, measure the rest
                rows[w] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                checks.append(f"trainer {name} width {w}: {rows[w]['error'][:300]}")
                continue
            one = rows.get(widths[0], {})
            if "tokens_per_s_per_gpu" in one:
                rows[w]["efficiency_vs_first_width"] = rows[w]["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
                for key in ("loss_fp32", "grad_norm_fp32"):
                    a, b = one[key], rows[w][key]
                    if abs(a - b) > PARITY_RTOL * max(abs(a), 1e-6):
                        checks.append(f"trainer {name}: {key} width {widths[0]} {a} vs width {w} {b}")
            print("trainer", name, w, json.dumps(rows[w]), flush=True)
    return out, checks


async def send_all(url: str, bodies: list[dict]) -> list:
    """POST every body to `url` at once; the answers in order."""
    from slime.utils.http_utils import close_sessions, post

    try:
        return await asyncio.gather(*(post(url, b) for b in bodies))
    finally:
        await close_sessions()


def rollouts(path: str, counts: list[int], work: str, smoke: bool) -> tuple:
    from slime.engine.launch import launch_engine
    from slime.router.router import launch_router, register_worker
    from slime.utils.http_utils import request_sync

    prompts, samples, new = (4, 2, 8) if smoke else (256, 8, 256)
    out, checks = {}, []
    for n in counts:
        engines, router = [], None
        try:
            router = launch_router(os.path.join(work, f"router-{n}"))
            for i in range(n):
                device = {"device": "cpu", "num_threads": 1} if smoke else {"device": "cuda", "gpu": str(i)}
                engines.append(launch_engine(path, os.path.join(work, f"engines-{n}"), index=i, **device))
            for e in engines:
                register_worker(router.url, e.url)
            ids = [[100 + (7 * p + j) % 5000 for j in range(64 if not smoke else 8)] for p in range(prompts)]
            params = {"max_new_tokens": new, "temperature": 1.0, "ignore_eos": True}

            bodies = [{"input_ids": p, "sampling_params": params} for p in ids for _ in range(samples)]
            start = time.perf_counter()
            answers = asyncio.run(send_all(router.url + "/generate", bodies))
            seconds = time.perf_counter() - start
            per_engine = [
                json.loads(request_sync("GET", e.url + "/server_info")[1])["internal_states"][0]["generated_tokens"]
                for e in engines
            ]
            tokens = sum(len(a["output_ids"]) for a in answers)
            out[n] = {
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "tokens_per_engine": per_engine,
                "max_over_min": max(per_engine) / max(min(per_engine), 1),
            }
        except Exception as exc:  # noqa: BLE001 - record it, measure the rest
            out[n] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            checks.append(f"rollouts with {n} engines: {out[n]['error'][:300]}")
        finally:
            for e in engines:
                e.stop()
            if router is not None:
                router.stop()
        print("rollouts", n, json.dumps(out[n]), flush=True)
    return out, checks


def layouts(path: str, data_dir: str, work: str, smoke: bool, gpus: int) -> tuple:
    """Each run a `python -m slime.train` process with its own Ray cluster (run before this process starts one)."""
    from benchmarks.gpu.real_weights import grpo_flags, split

    train_path = split(data_dir, work)[0] if data_dir else "builtin:arithmetic:train:4096:0"
    prompts, new, steps = (2, 8, 3) if smoke else (64, 256, 8)
    half = max(1, gpus // 2)
    runs = {
        "colocated_sync": ["--colocate", "--actor-num-gpus-per-node", str(max(gpus, 1))],
        "half_engines_fully_async": (
            ["--actor-num-gpus-per-node", str(half), "--rollout-num-gpus", str(half)] + ASYNC_FLAGS["fully_async"]
            if not smoke
            else ASYNC_FLAGS["fully_async"]
        ),
    }
    out, checks = {}, []
    for name, extra in runs.items():
        run_dir = os.path.join(work, name)
        flags = grpo_flags(path, train_path, run_dir, prompts, new, steps, "1e-6") + extra
        try:
            out[name] = train_run(flags, run_dir, dict(os.environ), prompts * 8, 1200)
        except Exception as exc:  # noqa: BLE001 - record it, run the rest
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2500]}
            checks.append(f"layouts {name}: {out[name]['error'][:300]}")
        print("layouts", name, json.dumps({k: v for k, v in out[name].items() if k != "steps"}), flush=True)
    a, b = (out.get(k, {}).get("samples_per_s") for k in runs)
    if a and b:
        out["async_over_colocated"] = b / a
    return out, checks


def checkpoint_move(path: str, width: int, work: str, smoke: bool, gpus: int) -> tuple:
    from slime.train import start_ray
    from tests.trainer.test_training import _synthetic_batch

    start_ray()
    data, later = _synthetic_batch(32, seed=1), _synthetic_batch(32, seed=2)
    wide = group(trainer_flags(path, os.path.join(work, "ckpt-wide"), width, 32, smoke), gpus)
    try:
        wide.train(0, data)
    except BaseException:
        wide.shutdown()
        raise
    narrow_flags = trainer_flags(path, os.path.join(work, "ckpt-narrow"), max(1, width // 2), 32, smoke)
    info, diff = save_and_reload(wide, lambda: group(narrow_flags, gpus), later, Path(work, "ckpt"))
    out = {"saved_on": width, "loaded_on": max(1, width // 2), "load": info, "logprob_max_diff": diff}
    ok = info.get("saved_world_size") == width and diff <= 1e-3
    return out, [] if ok else [f"checkpoint {width} -> {max(1, width // 2)} ranks: {out}"]


def main() -> None:
    import torch

    tokenizer_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    smoke_model = option("--smoke", "")
    smoke = bool(smoke_model)
    parts = option("--parts", "trainer,rollouts,layouts,checkpoint").split(",")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="scale-")
    gpus = 0 if smoke else torch.cuda.device_count()
    widths = [int(w) for w in option("--widths", "1,2" if smoke else "1,2,4,8").split(",") if smoke or int(w) <= gpus]
    results: dict = {"date": time.strftime("%Y-%m-%d"), "gpus": gpus, "widths": widths, "smoke": smoke}
    if not smoke:
        results["device"] = f"{gpus} x {torch.cuda.get_device_name(0)}"
        results["bf16_peak_tflops_per_gpu"] = bf16_peak() / 1e12
        if gpus < 4:
            finish(results, out_dir / "scale.json", [f"needs four GPUs or more, sees {gpus}"])
    names = option("--models", "qwen3-0.6b,qwen3-4b").split(",")
    paths = (
        {"tiny": smoke_model}
        if smoke
        else {n: build_model(n, tokenizer_dir, os.path.join(work, n), None if n in MODELS else QWEN3_4B) for n in names}
    )
    first = next(iter(paths.values()))
    data_dir = option("--data", "")  # slime-format JSONL files; default: the built-in arithmetic problems
    peak = results.get("bf16_peak_tflops_per_gpu", 0) * 1e12
    jobs = {  # layouts first: its runs start Ray clusters of their own, the others share this process's
        "layouts": lambda: layouts(first, data_dir, work, smoke, gpus),
        "trainer": lambda: trainer(paths, widths, work, smoke, gpus, peak),
        "rollouts": lambda: rollouts(
            first, [c for c in (1, 2, 4) if smoke or c <= gpus][: 2 if smoke else 3], work, smoke
        ),
        "checkpoint": lambda: checkpoint_move(first, widths[-1], work, smoke, gpus),
    }
    checks = run_parts(jobs, parts, results, out_dir / "scale.json")
    import ray

    ray.shutdown()
    finish(results, out_dir / "scale.json", checks)


if __name__ == "__main__":
    main()
