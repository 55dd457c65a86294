"""The engine benchmark on one GPU: the paged embedded engine beside transformers' `generate_batch` and `generate`.

Usage (repo root, on the GPU machine): python benchmarks/gpu/engine.py TOKENIZER_DIR OUT_DIR
    [--sections kernel,greedy,throughput,...] [--decode-steps 1,8]
Writes OUT_DIR/engine_benchmark.json after every section and prints a table; exits 1 when a check fails.
Random-weight models shaped like Qwen3-0.6B and SmolLM2-135M (see run.py), bf16.

Sections:
- kernel: the Triton paged decode kernel against a float64 torch reference (random cache, shuffled block tables),
  and the fused sampler (log-probs against float64, its draws against softmax by a chi-square test, its time);
  kernel_speed, split_speed: its timing over tile configurations, and with context splits;
- greedy: 16 prompts x 48 down to 18 greedy tokens from the engine (in-process, batched: the batch shrinks through
  buckets whose graphs are captured mid-run) against transformers `generate` one prompt at a time. A difference is
  allowed only at a near-tie: where the two tokens' bf16 logits (of transformers' own forward over the common
  prefix) differ by at most four bf16 units in the last place at their magnitude (0.25 for logits in [8, 16)): the
  engine's kernels round differently from transformers' own (its compiled layers keep fused intermediates in float32
  where transformers rounds each op to bf16; 3 units seen on the SmolLM2 shape);
- logprobs: the engine's sampled log-probs against a transformers bf16 forward over prompt + response (what the
  trainer computes): mean |diff| < 0.05, max < 0.25 nats;
- profile: the top kernels of one decode step (0.6B shape, 256 x 256 tokens) and of one prefill pass (64 x 128);
- throughput: the workload 256 prompts x 128 tokens, 256 new tokens each (ignore_eos, temperature 1) through the HTTP
  server; for the SmolLM2 shape also 128 and 512 prompts (its best batch); with `--decode-steps`, again at each of
  those --num-continuous-decode-steps;
- long (Qwen3-0.6B shape): 256 prompts x 128 tokens with new-token caps spread log-normally over 20..4,096
  (`long_generations`);
- baselines: the same workload with transformers `generate_batch` (continuous batching) and padded `generate`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import MODELS, build_model, run_section  # noqa: E402

from slime.engine.launch import launch_engine  # noqa: E402
from slime.utils.http_utils import request_sync  # noqa: E402
from tests.engine.test_paged_engine import _run  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 128, 256
SECTIONS = ("kernel", "kernel_speed", "split_speed", "greedy", "profile", "throughput", "long", "baselines")


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, min(vocab, 49152)) for _ in range(PROMPT_LEN)] for _ in range(n)]


def kernel_check() -> dict:
    """The decode kernel against float64 attention, per (dtype, heads, kv heads, head dim, batch, longest context):
    batches small enough to split the context across programs (2 to 16 splits) and one large enough not to. Each case
    also with the new token's key and value passed to the kernel (the engine's step), their cache slots cleared
    first: the kernel must write them back exactly and attend to them."""
    from slime.engine.triton_decode import paged_decode, splits_for

    out = {}
    for dtype, heads, kv_heads, dim, batch, longest in [
        (torch.bfloat16, 16, 8, 128, 24, 300),
        (torch.bfloat16, 9, 3, 64, 24, 300),
        (torch.float32, 16, 8, 128, 24, 300),
        (torch.bfloat16, 16, 8, 128, 3, 4000),
        (torch.float32, 9, 3, 64, 2, 2500),
        (torch.bfloat16, 16, 8, 128, 96, 300),
    ]:
        g = torch.Generator("cuda").manual_seed(0)
        bs = 16
        per_seq = -(-longest // bs)
        blocks = batch * per_seq + 1
        k = torch.randn(blocks * bs, kv_heads, dim, device="cuda", generator=g).to(dtype)
        v = torch.randn(blocks * bs, kv_heads, dim, device="cuda", generator=g).to(dtype)
        q = torch.randn(batch, heads, dim, device="cuda", generator=g).to(dtype)
        lens = torch.randint(1, longest, (batch,), generator=g, device="cuda").int()
        lens[0] = longest  # the longest context is always there
        perm = torch.randperm(blocks - 1, generator=g, device="cuda") + 1
        tables = perm[: batch * per_seq].view(batch, per_seq).int()
        got = paged_decode(q, k, v, tables, lens, dim**-0.5, bs)
        pos = (lens - 1).long()
        last = tables.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
        k_new, v_new, k_all, v_all = k[last].clone(), v[last].clone(), k.clone(), v.clone()
        k[last], v[last] = 0, 0
        got_write = paged_decode(q, k, v, tables, lens, dim**-0.5, bs, k_new, v_new)
        worst = [0.0, 0.0]
        for i in range(batch):
            n = int(lens[i])
            slots = tables[i].long()[torch.arange(n, device="cuda") // bs] * bs + torch.arange(n, device="cuda") % bs
            kk = k[slots].double().repeat_interleave(heads // kv_heads, 1)  # [n, H, D]
            vv = v[slots].double().repeat_interleave(heads // kv_heads, 1)
            p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), kk) * dim**-0.5, -1)
            ref = torch.einsum("hn,nhd->hd", p, vv)
            for j, result in enumerate((got, got_write)):
                worst[j] = max(worst[j], float((result[i].double() - ref).abs().max()))
        splits = splits_for(batch, kv_heads, 0)
        key = f"{str(dtype)[6:]}_h{heads}_kv{kv_heads}_d{dim}_b{batch}_ctx{longest}_splits{splits}"
        out[f"{key}_max_abs_err"] = worst[0]
        written = torch.equal(k, k_all) and torch.equal(v, v_all)
        out[f"{key}_with_write_max_abs_err"] = worst[1] if written else "the new keys/values were not written exactly"
    return out


def sampler_check() -> dict:
    """The fused Triton sampler (slime.engine.triton_sample): its log-probs against float64, a greedy row, and the
    distribution of 511 x 40 draws at temperature 0.7 over a 1,000-token vocabulary by a chi-square test; and its
    time against the torch sampler it replaced, on 256 rows of a 151,936 vocabulary (the 0.6B step)."""
    from slime.engine.sampling import sample_rows
    from slime.engine.triton_sample import sample_rows_fused

    torch.manual_seed(0)
    rows, vocab = 512, 1000
    logits = (torch.randn(vocab, device="cuda") * 2).expand(rows, vocab).to(torch.bfloat16).contiguous()
    temperature = torch.full((rows,), 0.7, device="cuda")
    greedy = torch.zeros(rows, dtype=torch.bool, device="cuda")
    greedy[-1], temperature[-1] = True, 1.0
    ref = torch.log_softmax(logits.double() / temperature.double()[:, None], -1)
    counts, lp_err, greedy_ok = torch.zeros(vocab, device="cuda", dtype=torch.float64), 0.0, True
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    for _ in range(40):
        tokens, logprobs = sample_rows_fused(logits, temperature, greedy, seed)
        seed += 1
        lp_err = max(lp_err, (logprobs.double() - ref.gather(1, tokens[:, None])[:, 0]).abs().max().item())
        counts += torch.bincount(tokens[:-1], minlength=vocab)
        greedy_ok &= int(tokens[-1]) == int(logits[-1].float().argmax())
    expected = torch.softmax(logits[0].double() / 0.7, -1) * counts.sum()
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expect = torch.cat([expected[keep], expected[~keep].sum()[None]])
    chi2, df = ((observed - expect) ** 2 / expect).sum().item(), int(keep.sum())
    big = torch.randn(256, 151936, device="cuda", dtype=torch.bfloat16) * 3
    temp, greedy = torch.ones(256, device="cuda"), torch.zeros(256, dtype=torch.bool, device="cuda")

    def torch_sampler():
        sample_rows(big, temp, greedy, torch.empty(big.shape, device="cuda").exponential_())

    times = {
        "fused_us": _us_per_call(lambda: sample_rows_fused(big, temp, greedy, seed), 20),
        "torch_us": _us_per_call(torch_sampler, 20),
    }
    return {
        "logprob_max_err": lp_err,
        "greedy_ok": greedy_ok,
        "chi2": chi2,
        "chi2_limit": df + 5 * math.sqrt(2 * df),
        "df": df,
        **times,
    }


def _decode_inputs(batch: int, ctx: int) -> tuple:
    """paged_decode's arguments for `batch` sequences of `ctx` cached tokens in shuffled 16-token blocks, the 0.6B
    shape (16 query / 8 key-value heads of 128, bf16): (q, k, v, tables, lens, scale, block size)."""
    heads, kv_heads, dim, bs = 16, 8, 128, 16
    blocks = batch * ctx // bs + 1
    k = torch.randn(blocks * bs, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    tables = (torch.randperm(blocks - 1, device="cuda") + 1).view(batch, -1).int()
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    return q, k, v, tables, lens, dim**-0.5, bs


def _us_per_call(fn, calls: int, warmup: int = 3) -> float:
    """Microseconds per call of fn (GPU work and launch included), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def _decode_us(inputs: tuple, calls: int) -> float:
    """Microseconds per paged_decode call (launch included), after 3 warm-up calls."""
    from slime.engine.triton_decode import paged_decode

    return _us_per_call(lambda: paged_decode(*inputs), calls)


def split_speed() -> dict:
    """The tail of a long rollout: a few sequences with long contexts (0.6B shape: 16 query / 8 key-value heads of
    128), the kernel with its context splits against one program per (sequence, head)."""
    from slime.engine import triton_decode

    out = {}
    for batch, ctx in ((1, 4096), (4, 4096), (16, 2048), (64, 1024), (256, 256)):
        inputs = _decode_inputs(batch, ctx)
        k = inputs[1]
        kv_bytes = 2 * batch * ctx * k.shape[1] * k.shape[2] * k.element_size()  # the keys and values read
        row = {}
        for label, cap in (("one_program", 1), ("split", triton_decode.MAX_SPLITS)):
            saved, triton_decode.MAX_SPLITS = triton_decode.MAX_SPLITS, cap
            try:
                us = _decode_us(inputs, 50)
            finally:
                triton_decode.MAX_SPLITS = saved
            row[label] = {"us": us, "gb_per_s": kv_bytes / us / 1e3}
        row["speedup"] = row["one_program"]["us"] / row["split"]["us"]
        out[f"b{batch}_ctx{ctx}"] = row
    return out


def kernel_speed() -> dict:
    """The decode kernel alone at the 0.6B workload's mid-point (256 sequences x 256 cached tokens, 16 query and 8
    key-value heads of 128), per launch shape; bandwidth counts the keys and values read."""
    from slime.engine import triton_decode

    inputs = _decode_inputs(256, 256)
    default, out = dict(triton_decode.CONFIG), {}
    try:
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    triton_decode.CONFIG.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                    us = _decode_us(inputs, 20)
                    out[f"n{block_n}_w{warps}_s{stages}"] = {"us": us, "gb_per_s": 2 * inputs[1].nbytes / us / 1e3}
    finally:
        triton_decode.CONFIG.clear()
        triton_decode.CONFIG.update(default)
    best = min(out, key=lambda c: out[c]["us"])
    return {"best": best, **out}


def profile_step(path: str) -> dict:
    """Where one decode step's GPU time goes: the eager decode body (what the graph replays) for 256 sequences of
    256 cached tokens, under the torch profiler; the top kernels by total CUDA time. Also the wall time per step of
    a run of 64 captured steps launched back to back (`launch` then `launch_next`, the host reading each step's
    tokens as the engine does): what the step costs beyond its kernels."""
    engine = in_process_engine(path, max_running_requests=256, kv_cache_tokens=256 * 352)  # ctx + run, and spare
    try:
        b, ctx, bs, run = 256, 256, engine.block_size, 64
        per = (ctx + run) // bs + 1

        def measure(engine):  # on the engine thread, between steps, like everything that touches the model
            runner = engine.runner
            with torch.inference_mode():
                tables = np.arange(1, 1 + b * per, dtype=np.int32).reshape(b, per)
                runner._fill(b, [5] * b, [ctx - 1] * b, tables[:, : ctx // bs], [1.0] * b, [False] * b)
                step = functools.partial(runner._decode_body, b)
                eager = _us_per_call(step, 10) / 1e3, _profiled(step)

                def steps() -> None:
                    prev = runner.launch([5] * b, [ctx - 1] * b, tables.tolist(), [1.0] * b, [False] * b)
                    for _ in range(run - 1):
                        nxt = runner.launch_next(prev)
                        prev.result()
                        prev = nxt
                    prev.result()

                return (*eager, _us_per_call(steps, 2, warmup=1) / 1e3 / run)

        eager_ms, prof, graph_ms = engine._on_engine_thread(measure, engine)
        return {"eager_step_ms": eager_ms, "graph_step_ms": graph_ms, **_top_kernels(prof)}
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def profile_prefill(path: str, vocab: int) -> dict:
    """Where a prefill pass's time goes: 64 new prompts x 128 tokens (8,192 tokens, the GPU's default pass) through
    the engine's own prefill (host bookkeeping included): wall time per pass, the top kernels, the host's top
    functions (cProfile, by own time), and the wall time with the decoder layers run eagerly (not compiled)."""
    import cProfile
    import io
    import pstats

    from slime.engine.embedded import Request
    from slime.engine.model_runner import _decoder_layers
    from slime.engine.sampling import SamplingParams

    engine = in_process_engine(path, max_running_requests=64, kv_cache_tokens=64 * 200)
    prompts = workload(64, vocab)
    try:

        def measure(engine):
            def one_pass() -> None:
                reqs = [Request(str(i), p, SamplingParams(), lambda r: None) for i, p in enumerate(prompts)]
                for r in reqs:
                    engine.scheduler.grow(r, PROMPT_LEN - 1)
                engine._prefill([(r, PROMPT_LEN - 1) for r in reqs])
                for r in reqs:
                    engine.scheduler.free(r, keep=False)

            with torch.inference_mode():
                ms, prof = _us_per_call(one_pass, 5, warmup=2) / 1e3, _profiled(one_pass)
                host = cProfile.Profile()
                host.enable()
                one_pass()
                torch.cuda.synchronize()
                host.disable()
                text = io.StringIO()
                pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(20)
                layers = _decoder_layers(engine.model)
                kept = [m._compiled_call_impl for m in layers]
                for m in layers:
                    m._compiled_call_impl = None
                try:
                    eager_ms = _us_per_call(one_pass, 5, warmup=2) / 1e3
                finally:
                    for m, impl in zip(layers, kept, strict=True):
                        m._compiled_call_impl = impl
            return ms, prof, text.getvalue(), eager_ms

        ms, prof, host, eager_ms = engine._on_engine_thread(measure, engine)
        return {"pass_ms": ms, "eager_layers_pass_ms": eager_ms, **_top_kernels(prof), "host": host.splitlines()[:45]}
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def _profiled(fn):
    """The torch profiler's record of one call of fn (CUDA kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def _top_kernels(prof) -> dict:
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]
    return {
        "gpu_us_total": sum(e.device_time_total for e in prof.key_averages()),
        "top": [{"kernel": e.key[:90], "us": e.device_time_total, "calls": e.count} for e in rows],
    }


def in_process_engine(path: str, **kw):
    from slime.engine.paged import PagedEngine

    return PagedEngine(path, dtype="bfloat16", device="cuda", **kw)


def greedy_and_logprobs(path: str, vocab: int) -> dict:
    from transformers import AutoModelForCausalLM

    from slime.engine.sampling import SamplingParams

    prompts = [p[: 8 + 7 * i] for i, p in enumerate(workload(16, vocab, seed=1))]
    lengths = [48 - 2 * i for i in range(len(prompts))]  # shrinks through 5 buckets, graphs captured on the way
    engine = in_process_engine(path, max_running_requests=64, kv_cache_tokens=1 << 16)
    try:
        greedy = _run(engine, prompts, [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
                                        for n in lengths])  # fmt: skip
        sampled = _run(engine, prompts, SamplingParams(max_new_tokens=48, temperature=1.0, ignore_eos=True))
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    exact, near_ties, bad = 0, [], []
    gaps = []
    with torch.inference_mode():
        for p, r in zip(prompts, greedy, strict=True):
            ref = model.generate(
                torch.tensor([p], device="cuda"), max_new_tokens=48, min_new_tokens=48, do_sample=False
            )[0, len(p) : len(p) + len(r.output_ids)].tolist()
            if ref == r.output_ids:
                exact += 1
                continue
            i = next(j for j, (a, b) in enumerate(zip(ref, r.output_ids, strict=True)) if a != b)
            logits = model(torch.tensor([p + ref[:i]], device="cuda")).logits[0, -1].float()
            gap = float(logits[ref[i]] - logits[r.output_ids[i]])
            ulp = 2.0 ** (math.floor(math.log2(abs(float(logits[ref[i]])) + 1e-30)) - 7)  # bf16 spacing there
            entry = {"prompt": len(p), "position": i, "logit_gap": gap, "bf16_ulp": ulp}
            (near_ties if abs(gap) <= 4 * ulp else bad).append(entry)
        for p, r in zip(prompts, sampled, strict=True):
            ids = torch.tensor([p + r.output_ids], device="cuda")
            lp = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].float(), -1)
            ref = lp.gather(1, ids[0, len(p) :, None])[:, 0]
            gaps += (ref - torch.tensor(r.logprobs, device="cuda")).abs().tolist()
    return {
        "prompts": len(prompts),
        "greedy_exact": exact,
        "greedy_near_ties": near_ties,
        "greedy_mismatches": bad,
        "logprob_mean_diff": sum(gaps) / len(gaps),
        "logprob_max_diff": max(gaps),
    }


def engine_throughput(path: str, vocab: int, batches: list[int], work: str, decode_steps: int | None = None) -> dict:
    """`decode_steps`: the engine's --num-continuous-decode-steps (None: its default, and an engine that predates
    the flag runs too)."""
    steps = {} if decode_steps is None else {"num_continuous_decode_steps": decode_steps}
    server = launch_engine(
        path,
        os.path.join(work, "logs"),
        dtype="bfloat16",
        device="cuda",
        max_running_requests=max(batches),
        num_threads=4,
        **steps,
    )
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "ignore_eos": True}
    try:

        def run(prompts: list[list[int]], sp: dict) -> tuple[int, float]:
            start = time.perf_counter()
            status, text = request_sync(
                "POST", f"{server.url}/generate", {"input_ids": prompts, "sampling_params": sp}, timeout=600
            )
            assert status == 200, text[:500]
            return sum(len(o["output_ids"]) for o in json.loads(text)), time.perf_counter() - start

        # warm-up: captures the decode graphs for every batch size the runs pass through
        run(workload(max(batches), vocab, seed=2), dict(params, max_new_tokens=8))
        run(workload(max(batches), vocab, seed=2)[:1], dict(params, max_new_tokens=8))
        for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224):
            if b < max(batches):
                run(workload(b, vocab, seed=3), dict(params, max_new_tokens=2))
        out = {}
        for b in batches:
            before = _engine_stats(server.url)
            tokens, seconds = run(workload(b, vocab), params)
            after = _engine_stats(server.url)
            phases = {k: after[k] - before[k] for k in ("prefill_seconds", "decode_seconds", "decode_steps")}
            out[f"prompts_{b}"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, **phases}
        status, text = request_sync("GET", f"{server.url}/server_info", None, timeout=30)
        out["decode_step_compiled"] = json.loads(text)["decode_step_compiled"]
        return out
    finally:
        server.stop()


def long_generations(path: str, vocab: int, work: str, prompts: int = 256) -> dict:
    """128-token prompts, new-token caps drawn log-normal (median 1,024) and clipped to 20..4,096, ignore_eos: an RL
    reasoning rollout's long tail. One HTTP request per prompt, all at once, so each one's completion time is seen:
    throughput, and the time to the last completion against the mean (what the engine does meanwhile: a shrinking
    batch)."""
    import concurrent.futures

    rng = random.Random(7)
    caps = [min(4096, max(20, round(rng.lognormvariate(math.log(1024), 0.8)))) for _ in range(prompts)]
    server = launch_engine(
        path, os.path.join(work, "logs"), dtype="bfloat16", device="cuda", max_running_requests=prompts, num_threads=4
    )
    try:

        def one(p: list[int], cap: int) -> tuple[int, float]:
            sp = {"max_new_tokens": cap, "temperature": 1.0, "ignore_eos": True}
            status, text = request_sync("POST", f"{server.url}/generate", {"input_ids": p, "sampling_params": sp}, 900)
            assert status == 200, text[:500]
            return len(json.loads(text)["output_ids"]), time.perf_counter() - start

        warm = workload(prompts, vocab, seed=2)  # captures every batch size's graph first
        with concurrent.futures.ThreadPoolExecutor(prompts) as pool:
            start = time.perf_counter()
            list(pool.map(one, warm, [1 + i % 64 for i in range(prompts)]))
            before = _engine_stats(server.url)
            start = time.perf_counter()
            done = list(pool.map(one, workload(prompts, vocab, seed=5), caps))
        seconds = max(t for _, t in done)
        after = _engine_stats(server.url)
        tokens = sum(n for n, _ in done)
        times = sorted(t for _, t in done)
        return {
            "prompts": prompts,
            "new_token_caps": {"mean": sum(caps) / prompts, "max": max(caps), "min": min(caps)},
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "completion_seconds": {"mean": sum(times) / prompts, "median": times[prompts // 2], "last": times[-1]},
            "last_over_mean": times[-1] / (sum(times) / prompts),
            "decode_steps": after["decode_steps"] - before["decode_steps"],
            "mean_rows_per_step": (after["generated_tokens"] - before["generated_tokens"])
            / max(1, after["decode_steps"] - before["decode_steps"]),
            "preemptions": after["preemptions"] - before["preemptions"],
        }
    finally:
        server.stop()


def _engine_stats(url: str) -> dict:
    status, text = request_sync("GET", f"{url}/server_info", None, timeout=30)
    return json.loads(text)["internal_states"][0]


def baselines(path: str, vocab: int, prompts: int) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    ids = workload(prompts, vocab)
    out = {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    cfg = GenerationConfig(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        eos_token_id=None,
        pad_token_id=0,
    )
    try:
        with torch.inference_mode():
            model.generate(
                torch.tensor(ids[:8], device="cuda"),
                generation_config=cfg.__class__(**{**cfg.to_dict(), "max_new_tokens": 4, "min_new_tokens": 4}),
            )
            torch.cuda.synchronize()
            start = time.perf_counter()
            gen = model.generate(torch.tensor(ids, device="cuda"), generation_config=cfg)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        tokens = (gen.shape[1] - PROMPT_LEN) * gen.shape[0]
        out["generate"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    except Exception as exc:  # noqa: BLE001
        out["generate"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    try:  # transformers' continuous batching: its paged cache and scheduler run in a thread of their own
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
        model = model.cuda().eval()
        start = time.perf_counter()
        res = model.generate_batch(inputs=ids, generation_config=cfg)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.generated_tokens) for r in res.values())
        out["generate_batch"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    except Exception as exc:  # noqa: BLE001
        out["generate_batch"] = {"error": f"{type(exc).__name__}: {exc}"[:500], "tb": traceback.format_exc()[-1500:]}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def failed_checks(r: dict) -> list[str]:
    bad = [f"{k}: {v['error'][:300]}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
    for key, err in r.get("kernel", {}).items():  # max |error| vs float64 of outputs of size ~1
        if isinstance(err, str) or err > (0.02 if "bfloat16" in key else 1e-4):
            bad.append(f"kernel {key} = {err}")
    sampler = r.get("sampler", {})
    if sampler and not (sampler["logprob_max_err"] < 1e-4 and sampler["greedy_ok"]):
        bad.append(f"sampler: log-prob error {sampler['logprob_max_err']}, greedy ok {sampler['greedy_ok']}")
    if sampler and sampler["chi2"] > sampler["chi2_limit"]:
        bad.append(f"sampler: chi-square {sampler['chi2']:.1f} > {sampler['chi2_limit']:.1f} (df {sampler['df']})")
    for name in MODELS:
        g = r.get(f"{name}/greedy", {})
        if g.get("greedy_mismatches"):
            bad.append(f"{name}: greedy differs from transformers beyond a near-tie {g['greedy_mismatches']}")
        if g and not (g["logprob_mean_diff"] < 0.05 and g["logprob_max_diff"] < 0.25):
            bad.append(f"{name}: engine log-probs vs transformers {g['logprob_mean_diff']} / {g['logprob_max_diff']}")
    for name in MODELS:  # an eager step is a silent 30 % slowdown (seen when compilation ran before the cache)
        t = r.get(f"{name}/throughput", {})
        if t and not t.get("decode_step_compiled"):
            bad.append(f"{name}: the engine's decode step was not compiled (see its log)")
    # regression floors, ~15 % under the 2026-12-03 figures (55k, 141k; calls vary by about that much)
    for name, batch, floor in (("qwen3-0.6b", "prompts_256", 47000), ("smollm2-135m", "prompts_512", 120000)):
        got = r.get(f"{name}/throughput", {}).get(batch, {}).get("tokens_per_s", 0)
        if f"{name}/throughput" in r and got < floor:
            bad.append(f"{name} {batch}: {got:.0f} tok/s < {floor:,}")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer_dir")
    parser.add_argument("out")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--decode-steps",
        default="",
        help="comma-separated --num-continuous-decode-steps values: each gets a throughput section of its own "
        "beside the engine's default",
    )
    args = parser.parse_args()
    out, tokenizer_dir = args.out, args.tokenizer_dir
    os.makedirs(out, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    path_out = Path(out) / "engine_benchmark.json"

    def section(key: str, fn, *a):
        run_section(results, path_out, key, fn, *a)

    import transformers

    results["transformers"] = transformers.__version__
    work = tempfile.mkdtemp(prefix="engine-bench-")
    want = set(args.sections.split(","))
    if want - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(want - set(SECTIONS))}; known: {','.join(SECTIONS)}")
    for key, fn in (("kernel", kernel_check), ("kernel_speed", kernel_speed), ("split_speed", split_speed)):
        if key in want:
            section(key, fn)
    if "kernel" in want:
        section("sampler", sampler_check)
    for name in MODELS:
        per_model = {"greedy", "profile", "throughput", "baselines"} | ({"long"} if name == "qwen3-0.6b" else set())
        if not want & per_model:
            continue
        path = build_model(name, tokenizer_dir, os.path.join(work, name))
        vocab = MODELS[name]["vocab_size"]
        if "greedy" in want:
            section(f"{name}/greedy", greedy_and_logprobs, path, vocab)
        if "profile" in want:
            if name == "qwen3-0.6b":
                section(f"{name}/profile", profile_step, path)
            section(f"{name}/prefill_profile", profile_prefill, path, vocab)
        if "throughput" in want:
            batches = [256] if name == "qwen3-0.6b" else [128, 256, 512]
            section(f"{name}/throughput", engine_throughput, path, vocab, batches, work)
            for k in [int(v) for v in args.decode_steps.split(",") if v]:
                section(f"{name}/throughput_steps_{k}", engine_throughput, path, vocab, batches, work, k)
        if name == "qwen3-0.6b" and "long" in want:
            section(f"{name}/long", long_generations, path, vocab, work)
        if "baselines" in want:
            section(f"{name}/baselines", baselines, path, vocab, 256)
    results["failed_checks"] = failed_checks(results)
    path_out.write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}  {results['date']}  torch {results['torch']}  transformers {results['transformers']}")
    for name in MODELS:
        row = {
            k: round(v["tokens_per_s"])
            for k, v in results.get(f"{name}/throughput", {}).items()
            if isinstance(v, dict) and "tokens_per_s" in v
        }
        base = {
            k: round(v["tokens_per_s"]) if "tokens_per_s" in v else v.get("error", "")[:80]
            for k, v in results.get(f"{name}/baselines", {}).items()
        }
        print(f"{name}: engine {row} | transformers {base}")
    failed = results["failed_checks"]
    print("checks:", "all passed" if not failed else "\n  ".join(["FAILED", *failed]))
    sys.exit(1 if results["failed_checks"] else 0)


if __name__ == "__main__":
    main()
