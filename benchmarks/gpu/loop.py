"""Rollouts in the loop against the engine alone, on one GPU, at the same concurrency (issue 23, item 1).

Usage (repo root, on the GPU machine): python benchmarks/gpu/loop.py TOKENIZER_DIR OUT_DIR [MODEL_DIR]
    [--only 512x384] (one workload) [--rollouts N] (in-loop rollouts, default 2; the figure is the last one's)
    [--train-flags "--sglang-server-concurrency 512"] (more slime.train flags for the in-loop runs)
MODEL_DIR: real weights (e.g. SmolLM2-135M-Instruct converted by slime.hub.provision); default a random-weight model
of the SmolLM2 shape. Writes OUT_DIR/loop_benchmark.json after every measurement.

Per workload (prompts x samples x max new tokens): the engine alone (one engine, the same default settings the loop
gives it, every request sent at once, the same chat-formatted arithmetic prompts and sampling; one engine serves
every workload in turn) and then `slime.train` for two rollouts in the default shared layout. Both sides report the
engine's counters over the workload (prefill passes and seconds, decode steps and seconds), so time the engine
spent is told from time spent around it. The in-loop figure is the second rollout's
rollout/tokens_per_s (generated tokens over the rollout's seconds, grading included); the long tail is reported as
the time the last group was graded against the mean group. Exits non-zero when in-loop < 0.8 x standalone.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu.run import build_model, finish  # noqa: E402
from slime.config.arguments import parse_args  # noqa: E402

WORKLOADS = [(64, 8, 384), (128, 8, 1024)]  # 512 x 384 and 1,024 x 1,024
RATIO = 0.8


def flags(path: str, run_dir: str, prompts: int, samples: int, new: int, rollouts: int = 2) -> list[str]:
    return [
        "--hf-checkpoint", path, "--prompt-data", "builtin:arithmetic:train:2048:0", "--input-key", "prompt",
        "--label-key", "label", "--apply-chat-template", "--rm-type", "math", "--rollout-batch-size", str(prompts),
        "--n-samples-per-prompt", str(samples), "--rollout-max-response-len", str(new), "--rollout-temperature",
        "1.0", "--num-rollout", str(rollouts), "--global-batch-size", str(prompts * samples),
        "--use-dynamic-batch-size", "--lr", "1e-6", "--output-dir", run_dir,
    ]  # fmt: skip


def standalone(args, workloads: list[tuple[list[list[int]], int, int]]) -> list[dict]:
    """The engine alone on each workload (prompt ids, samples, max new tokens): every request sent at once, straight
    to one engine launched as the loop launches it; what the engine did is its counters over the workload."""
    from slime.engine.fleet import engine_counters
    from slime.engine.launch import launch_engine
    from slime.utils.http_utils import close_sessions, post, request_sync

    engine = launch_engine(
        args.hf_checkpoint,
        os.path.join(args.output_dir, "standalone_logs"),
        dtype=args.rollout_engine_dtype,
        device="cuda",
        max_running_requests=args.sglang_max_running_requests,
        mem_fraction_static=args.sglang_mem_fraction_static,
    )

    async def run(batch: list[list[int]], sampling: dict) -> list:
        out = await asyncio.gather(
            *(post(engine.url + "/generate", {"input_ids": p, "sampling_params": sampling}) for p in batch)
        )
        await close_sessions()
        return out

    results = []
    try:
        asyncio.run(run(workloads[0][0][:8], {"max_new_tokens": 8}))  # warm-up
        for prompts, samples, new in workloads:
            # no prefix cached by an earlier workload: the loop starts a fresh engine
            request_sync("POST", engine.url + "/flush_cache", {})
            before = engine_counters([engine.url])
            start = time.perf_counter()
            outs = asyncio.run(
                run([p for p in prompts for _ in range(samples)], {"max_new_tokens": new, "temperature": 1.0})
            )
            seconds = time.perf_counter() - start
            after = engine_counters([engine.url])
            tokens = sum(len(o["output_ids"]) for o in outs)
            engine_side = {f"engine/{k}": v - before.get(k, 0) for k, v in after.items()}
            results.append({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds} | engine_side)
    finally:
        engine.stop()
    return results


def in_loop(args) -> dict:
    from slime.train import train

    train(args)
    steps = [json.loads(x) for x in open(os.path.join(args.output_dir, "metrics.jsonl"))]
    keep = (
        "rollout/tokens", "rollout/tokens_per_s", "rollout/response_len_mean", "rollout/group_seconds_mean",
        "rollout/group_seconds_last", "rollout/group_seconds_last_over_mean", "perf/rollout_seconds",
        "train/seconds", "train/tokens_per_s", "perf/token_budget", "sync/seconds", "perf/step_seconds",
        "engine/generated_tokens", "engine/prefill_tokens", "engine/prefix_shared_tokens", "engine/prefill_passes",
        "engine/prefill_seconds", "engine/decode_steps", "engine/decode_seconds", "engine/preemptions",
        "engine/graph_captures",
    )  # fmt: skip
    return {"steps": [{k: s.get(k) for k in keep} for s in steps]}


def main() -> None:
    from transformers import AutoTokenizer

    from slime.data.builtin import arithmetic_rows

    tokenizer_dir, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="loop-bench-")
    options = {a: sys.argv[i + 1] for i, a in enumerate(sys.argv) if a in ("--only", "--rollouts", "--train-flags")}
    positional = [a for i, a in enumerate(sys.argv) if a not in options and sys.argv[i - 1] not in options]
    path = positional[3] if len(positional) > 3 else build_model("smollm2-135m", tokenizer_dir, os.path.join(work, "m"))
    tok = AutoTokenizer.from_pretrained(path)
    results: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "model": path}
    checks = []
    runs = []
    for prompts, samples, new in WORKLOADS:
        key = f"{prompts * samples}x{new}"
        if options.get("--only", key) != key:
            continue
        args = parse_args(
            flags(path, os.path.join(work, key), prompts, samples, new, int(options.get("--rollouts", 2)))
            + options.get("--train-flags", "").split(),
            cluster_gpus=torch.cuda.device_count(),
        )
        rows = arithmetic_rows("train", prompts, 1)
        ids = [
            tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
            for r in rows
        ]  # fmt: skip
        results[key] = {"rows": args.sglang_max_running_requests, "client_concurrency": args.sglang_server_concurrency}
        runs.append((key, args, (ids, samples, new)))
    try:  # one engine for every workload: the same launch settings (they do not depend on the workload)
        for (key, _, _), alone in zip(runs, standalone(runs[0][1], [w for _, _, w in runs]), strict=True):
            results[key]["standalone"] = alone
            print(key, "standalone", json.dumps(alone), flush=True)
    except Exception as exc:  # noqa: BLE001 - record it
        checks.append(f"standalone: {type(exc).__name__}: {exc}"[:300])
    for key, args, _ in runs:
        entry = results[key]
        try:
            entry["in_loop"] = in_loop(args)
            if "standalone" in entry:
                loop_rate = entry["in_loop"]["steps"][-1]["rollout/tokens_per_s"]
                entry["ratio"] = loop_rate / entry["standalone"]["tokens_per_s"]
                if entry["ratio"] < RATIO:
                    checks.append(f"{key}: in-loop {entry['ratio']:.2f} x standalone < {RATIO}")
        except Exception as exc:  # noqa: BLE001 - record it, measure the rest
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            checks.append(f"{key}: {entry['error'][:200]}")
        print(key, json.dumps(entry)[:1500], flush=True)
        Path(out, "loop_benchmark.json").write_text(json.dumps(results, indent=1))
    finish(results, Path(out, "loop_benchmark.json"), checks)


if __name__ == "__main__":
    main()
