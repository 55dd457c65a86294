"""Rollout throughput: the embedded engine's backends (through its HTTP server) vs plain transformers `generate`.

Same work for both: 64 prompts x 4 samples x 128 new tokens (EOS ignored, so every response is 128 tokens), sampling
at temperature 1, SmolLM2-135M-Instruct, at most 64 sequences decoded together.

    .venv/bin/python benchmarks/rollout_throughput.py [--dtype float32|bfloat16] [--prompts 64] [--samples 4]
                                                      [--repeat 1]

`--repeat N` alternates the backends N times (paged, padded, paged, ...) and reports every run and the median: on a
shared VM one run of either can be 10% off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

import torch


def prompts(tokenizer, n: int) -> list[list[int]]:
    from slime.data.builtin import arithmetic_rows

    rows = arithmetic_rows("test", n, seed=0)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for r in rows
    ]


def bench_engine(
    model: str, ids: list[list[int]], samples: int, new: int, dtype: str, rows: int, backend: str = "paged"
) -> dict:
    from slime.engine.launch import launch_engine
    from slime.utils.http_utils import close_sessions, post

    server = launch_engine(model, "outputs/bench_logs", dtype=dtype, max_running_requests=rows, backend=backend)
    params = {"max_new_tokens": new, "ignore_eos": True, "temperature": 1.0}

    async def run() -> list:
        reqs = [
            post(server.url + "/generate", {"input_ids": p, "sampling_params": params, "return_logprob": True})
            for p in ids
            for _ in range(samples)
        ]
        out = await asyncio.gather(*reqs)
        await close_sessions()
        return out

    try:
        start = time.perf_counter()
        outs = asyncio.run(run())
        seconds = time.perf_counter() - start
    finally:
        server.stop()
    tokens = sum(len(o["output_ids"]) for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}


def bench_generate(model: str, ids: list[list[int]], samples: int, new: int, dtype: str, rows: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
    seqs = [p for p in ids for _ in range(samples)]
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(seqs), rows):
        batch = seqs[i : i + rows]
        width = max(len(s) for s in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in batch])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in batch])
        with torch.inference_mode():
            out = m.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                output_scores=False,
            )
        tokens += (out.shape[1] - width) * len(batch)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rows", type=int, default=64, help="sequences decoded together, both systems")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each engine backend, alternated")
    args = ap.parse_args()
    from slime.hub.provision import resolve_checkpoint
    from slime.utils.processing_utils import load_tokenizer

    model = resolve_checkpoint(args.model)
    ids = prompts(load_tokenizer(model), args.prompts)
    common = (model, ids, args.samples, args.new_tokens, args.dtype, args.rows)
    runs: dict[str, list[dict]] = {"paged": [], "padded": []}
    for _ in range(args.repeat):
        for backend, out in runs.items():
            out.append(bench_engine(*common, backend=backend))
    engines = {}
    for backend, out in runs.items():
        median = statistics.median(r["tok_per_s"] for r in out)
        engines[f"embedded_engine_{backend}"] = out[0] if len(out) == 1 else {"runs": out, "median_tok_per_s": median}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        **{k: getattr(args, k) for k in ("dtype", "prompts", "samples", "new_tokens", "rows")},
        **engines,
        "transformers_generate": bench_generate(*common),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
