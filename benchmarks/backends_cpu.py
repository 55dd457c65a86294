"""The embedded engine against vLLM's CPU build (--rollout-backend vllm) on this machine, one after the other in one
process: the same prompts through the same SGLang-protocol /generate, every request sent at once.

    SLIME_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python benchmarks/backends_cpu.py \
        --out benchmarks/results/backends_cpu_<date>.json

Workload (the engine's foundation workload): SmolLM2-135M-Instruct, 64 prompts x 4 samples, exactly 128 new tokens
each (ignore_eos), temperature 1, the same dtype on both (--dtype; bf16 by default: pick float32 on a processor
without bf16 arithmetic). --backends embedded,embedded,vllm --rows 64,256,256 measures the listed runs in order.
Reports generated tokens per second of wall time from the first request to the last answer, and each server's
start-up seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from slime.engine.launch import launch_engine
from slime.hub.provision import resolve_checkpoint
from slime.utils.http_utils import post
from slime.utils.processing_utils import load_tokenizer


def prompts(model: str, n: int) -> list[list[int]]:
    tok = load_tokenizer(model)
    texts = [f"Question: what is {7 * i + 3} plus {11 * i + 5}? Think step by step, then answer." for i in range(n)]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


async def generate_all(url: str, ids: list[list[int]], samples: int, new_tokens: int) -> tuple[float, int]:
    params = {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}

    async def one(p: list[int]) -> int:
        body = {"input_ids": p, "sampling_params": params, "return_logprob": True}
        out = await post(f"{url}/generate", body, timeout=3600)
        return len(out["output_ids"])

    start = time.monotonic()
    counts = await asyncio.gather(*(one(p) for p in ids for _ in range(samples)))
    return time.monotonic() - start, sum(counts)


def measure(
    backend: str, model: str, ids: list[list[int]], samples: int, new_tokens: int, logs: str, dtype: str, rows: int
) -> dict:
    start = time.monotonic()
    srv = launch_engine(
        model, logs, rollout_backend=backend, dtype=dtype, max_running_requests=rows, startup_timeout=1200
    )
    startup = time.monotonic() - start
    try:
        asyncio.run(generate_all(srv.url, ids[:4], 1, 8))  # warm-up
        seconds, tokens = asyncio.run(generate_all(srv.url, ids, samples, new_tokens))
    finally:
        srv.stop()
    return {"startup_seconds": startup, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--backends", default="embedded,vllm", help="comma-separated; a backend may repeat")
    p.add_argument("--dtype", default="bfloat16", help="weights and compute of both engines")
    p.add_argument("--rows", default="256", help="batch rows per backend run, comma-separated (one value: all)")
    p.add_argument("--out", default=None, help="JSON results file")
    a = p.parse_args()
    model = resolve_checkpoint("SmolLM2-135M-Instruct")
    ids = prompts(model, a.prompts)
    result = {
        "benchmark": "backends_cpu",
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{os.cpu_count()} CPUs",
        "workload": f"{a.prompts} prompts x {a.samples} samples x {a.new_tokens} new tokens, {a.dtype}, temperature 1",
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as logs:
        backends = a.backends.split(",")
        rows = a.rows.split(",") * (len(backends) if "," not in a.rows else 1)
        for i, (backend, n) in enumerate(zip(backends, rows, strict=True)):
            run = measure(backend, model, ids, a.samples, a.new_tokens, logs, a.dtype, int(n))
            result["runs"][f"{i}: {backend}, {n} rows"] = run
            print(backend, n, json.dumps(run), flush=True)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
