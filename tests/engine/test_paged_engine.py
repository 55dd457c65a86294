"""The paged backend: block bookkeeping, attention over the paged cache against a float64 reference, and whole-engine
greedy decoding against transformers `generate` (fp32, CPU) under prefix sharing, chunked prefill and preemption."""

import logging
import threading
import time

import pytest
import torch

from slime.engine.kv_cache import BlockPool, CacheFull
from slime.engine.paged_attention import PagedForward, gather_plan, paged_attention
from slime.engine.sampling import SamplingParams


def test_block_pool_refcounts_and_prefix_sharing():
    pool = BlockPool(num_blocks=6, block_size=4)  # block 0 is scratch: 5 usable
    assert pool.free == 5 and pool.capacity_tokens == 20
    tokens = list(range(11))
    a = [pool.allocate() for _ in range(3)]
    assert 0 not in a
    pool.publish(tokens, a, num_cached=10)  # two full blocks published, the third is partial
    assert pool.share_prefix(tokens, limit=10) == a[:2]  # tokens[:8]
    assert pool.share_prefix(tokens, limit=7) == a[:1]  # a request must compute at least its last tokens itself
    assert pool.share_prefix([99] + tokens[1:], limit=10) == []  # the first block differs, so nothing matches
    other = tokens[:4] + [50, 51, 52, 53]
    assert pool.share_prefix(other, limit=8) == a[:1]  # same first block, different second
    pool.release(a)  # a[0] was taken 4 times, a[1] twice, a[2] once
    pool.release(a[:2])
    pool.release(a[:1])
    assert pool.free == 4  # a[0] still held by one of the shares above
    pool.release(a[:1])
    assert pool.free == 5 and pool.cached == 2  # a[2] (partial, never published) is free; a[0], a[1] stay cached
    assert pool.share_prefix(tokens, limit=10) == a[:2]  # the cache outlives the requests that filled it
    pool.release(a[:2])
    got = [pool.allocate() for _ in range(5)]  # three free blocks first, then the cached ones are evicted
    assert sorted(got) == [1, 2, 3, 4, 5] and pool.cached == 0 and pool.evicted == 2
    assert pool.share_prefix(tokens, limit=10) == []  # evicted: no longer findable
    with pytest.raises(CacheFull):
        pool.allocate()


def test_the_prefix_cache_evicts_least_recently_used_leaves_first():
    pool = BlockPool(num_blocks=8, block_size=2)  # 7 usable
    prompt = [1, 2, 3, 4]
    trunk = [pool.allocate(), pool.allocate()]
    pool.publish(prompt, trunk, 4)
    branches = []
    for tail in ([5, 6], [7, 8]):  # two continuations of the same prompt, the first finishing first
        blocks = pool.share_prefix(prompt + tail + [0], 6) + [pool.allocate()]
        pool.publish(prompt + tail, blocks, 6)
        branches.append(blocks)
    pool.release(branches[0])
    pool.release(branches[1])
    pool.release(trunk)
    assert pool.cached == 4 and pool.free == 7
    while pool.free > 4:  # use up the never-used blocks first
        pool.allocate()
    pool.allocate()  # evicts the least recently used leaf: the first continuation's last block
    assert pool.share_prefix(prompt + [5, 6, 0], 6) == trunk  # its prompt is still there
    assert pool.share_prefix(prompt + [7, 8, 0], 6) == trunk + [branches[1][2]]
    pool.release(trunk)
    pool.release(trunk + [branches[1][2]])
    pool.allocate()
    pool.allocate()
    # only the trunk's first block can be left: evicting a block evicts what was published under it
    assert pool.cached == 1 and pool.share_prefix(prompt + [7, 8, 0], 6) == trunk[:1]
    pool.forget_prefixes()  # new weights: nothing cached survives, and idle blocks are free again
    assert pool.cached == 0 and pool.share_prefix(prompt, 4) == []


def test_blocks_from_old_weights_are_not_shared():
    pool = BlockPool(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    held = [pool.allocate(), pool.allocate()]
    pool.forget_prefixes()  # the weights changed while `held` was being computed
    pool.publish(tokens, held, num_cached=4)
    assert pool.share_prefix(tokens, limit=4) == []
    fresh = [pool.allocate(), pool.allocate()]
    pool.publish(tokens, fresh, num_cached=4)
    assert pool.share_prefix(tokens, limit=4) == fresh


def _reference(q, k_seq, v_seq, start, scale):
    """float64 causal attention of queries at positions start.. over keys 0..; q [n_q, H, D], k/v [n_k, Hkv, D]."""
    group = q.shape[1] // k_seq.shape[1]
    k, v = k_seq.double().repeat_interleave(group, 1), v_seq.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    pos = torch.arange(start, start + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)


@pytest.mark.parametrize("decode", [False, True])
def test_paged_attention_matches_float64_reference(decode):
    """Three sequences with a cached prefix (shuffled blocks) and new tokens packed back to back: the keys written
    into the cache and the attention output both match a dense float64 computation."""
    torch.manual_seed(0)
    heads, kv_heads, dim, bs = 4, 2, 8, 4
    cached = [5, 0, 9]
    new = [1, 1, 1] if decode else [3, 6, 1]
    totals = [c + n for c, n in zip(cached, new, strict=True)]
    blocks = torch.randperm(15)[: sum(-(-t // bs) for t in totals)] + 1
    tables, i = [], 0
    for t in totals:
        tables.append(blocks[i : i + -(-t // bs)].tolist())
        i += -(-t // bs)
    k_cache = [torch.randn(16 * bs, kv_heads, dim)]
    v_cache = [torch.randn(16 * bs, kv_heads, dim)]
    k_full = [torch.randn(t, kv_heads, dim) for t in totals]  # the whole sequences' keys
    v_full = [torch.randn(t, kv_heads, dim) for t in totals]
    for s in range(3):  # the prefix is already in the cache
        for p in range(cached[s]):
            slot = tables[s][p // bs] * bs + p % bs
            k_cache[0][slot], v_cache[0][slot] = k_full[s][p], v_full[s][p]
    q = [torch.randn(n, heads, dim) for n in new]
    slots = [tables[s][p // bs] * bs + p % bs for s in range(3) for p in range(cached[s], totals[s])]
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q_index, q_flat, mask = gather_plan(torch.tensor(cached), torch.tensor(new), max(new), width * bs)
    fwd = PagedForward(k_cache, v_cache, torch.tensor(slots), q_index, q_flat, table, mask, block_size=bs)
    module = torch.nn.Module()
    module.layer_idx = 0
    query = torch.cat(q)[None].transpose(1, 2)  # [1, H, T, D]
    key = torch.cat([k[c:] for k, c in zip(k_full, cached, strict=True)])[None].transpose(1, 2)
    value = torch.cat([v[c:] for v, c in zip(v_full, cached, strict=True)])[None].transpose(1, 2)
    out, _ = paged_attention(module, query, key, value, None, scaling=dim**-0.5, paged=fwd)
    expected = torch.cat([_reference(q[s], k_full[s], v_full[s], cached[s], dim**-0.5) for s in range(3)])
    assert out.shape == (1, sum(new), heads, dim)
    assert torch.allclose(out[0].double(), expected, atol=1e-5)
    for s in range(3):
        for p in range(totals[s]):
            assert torch.equal(k_cache[0][tables[s][p // bs] * bs + p % bs], k_full[s][p])


def _run(engine, prompts, params, resume: bool = False):
    """Generate for every prompt (params: one for all, or one each); `resume`: the engine was paused, so all are
    queued before it resumes and admitted together."""
    done, out = threading.Event(), {}

    def cb(r):
        out[r.rid] = r
        if len(out) == len(prompts):
            done.set()

    for i, p in enumerate(prompts):
        engine.submit(p, params[i] if isinstance(params, list) else params, cb, rid=str(i))
    if resume:
        engine.resume()
    assert done.wait(300), "engine did not finish"
    return [out[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def greedy_reference(tiny_model_path):
    torch.manual_seed(1)
    lengths = [1, 3, 16, 17, 33, 40, 9]
    prompts = [torch.randint(10, 2000, (n,)).tolist() for n in lengths]
    prompts += [prompts[4]] * 3  # n samples of one prompt: prefilled once, shared
    prompts += [prompts[4][:20] + [5, 6, 7]]  # shares the first block(s) only
    return prompts, _generate_greedy(tiny_model_path, prompts, 20)


def _generate_greedy(path: str, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers `generate`, greedy, fp32, one prompt at a time: the reference token ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [
            model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]


@pytest.mark.parametrize(
    "backend,kw",
    [
        ("paged", {}),
        # preemption and chunked prefill: passes of <= 24 tokens, each request's share <= 8
        ("paged", {"kv_cache_tokens": 160, "max_prefill_tokens": 24, "chunked_prefill_size": 8}),
        ("paged", {"decode_steps": 4}),  # continuous steps (the GPU default, here through the torch path)
        ("paged", {"decode_steps": 4, "kv_cache_tokens": 160, "max_prefill_tokens": 24}),
        ("padded", {}),
    ],
)
def test_greedy_equals_transformers_generate(tiny_model_path, greedy_reference, backend, kw):
    from slime.engine.padded import PaddedEngine
    from slime.engine.paged import PagedEngine

    prompts, ref = greedy_reference
    cls = PagedEngine if backend == "paged" else PaddedEngine
    kw = dict(kw, block_size=4) if backend == "paged" else kw
    engine = cls(tiny_model_path, **kw)
    continued = _count_calls(engine.runner, "launch_next") if "decode_steps" in kw else None
    passes = []  # each prefill pass's tokens per request
    if "chunked_prefill_size" in kw:
        prefill = engine.runner.prefill
        engine.runner.prefill = lambda *a: (passes.append(list(a[-1])), prefill(*a))
    try:
        out = _run(engine, prompts, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
        if passes:
            assert max(max(p) for p in passes) <= 8 and max(sum(p) for p in passes) <= 24
            assert max(sum(p) for p in passes) > 8  # several requests' chunks share a pass
        if continued is not None:
            assert continued[0] > 0  # steps really followed steps without the host reading the tokens between
        for i, r in enumerate(out):
            assert r.output_ids == ref[i], f"prompt {i} ({len(prompts[i])} tokens)"
            assert r.finish_reason["type"] == "length"
        if backend == "paged":
            assert engine.stats["prefix_shared_tokens"] > 0
            if "kv_cache_tokens" in kw:
                assert engine.stats["preemptions"] > 0
            engine.wait_idle(10)
            assert engine.scheduler.pool.free == engine.scheduler.pool.num_blocks - 1  # every block came back
    finally:
        engine.shutdown()


def _count_calls(runner, name: str) -> list[int]:
    """Count the calls of runner.<name> (a one-element list, updated as they happen)."""
    count, method = [0], getattr(runner, name)

    def counted(*args, **kw):
        count[0] += 1
        return method(*args, **kw)

    setattr(runner, name, counted)
    return count


class _CpuStandInForCudaGraph:
    """What matters of a CUDA graph here (CPU has none): capturing runs the step on padding rows, which overwrites
    the static inputs, and a replay computes from whatever the static inputs hold then, into the same outputs."""

    def __init__(self, runner, b: int):
        self.runner, self.b = runner, b
        runner._fill_padding(b)
        self.out = runner._decode_body(b)

    def replay(self) -> None:
        for static, new in zip(self.out, self.runner._decode_body(self.b), strict=True):
            static.copy_(new)


def test_continuous_steps_with_graphs_captured_on_the_way(tiny_model_path, greedy_reference):
    """Graphs captured lazily while requests decode, at the start of a run and when the batch shrinks into a
    smaller bucket in the middle of one (capture runs on padding rows, overwriting the static inputs the running
    rows need), do not change what is generated."""
    from slime.engine.paged import PagedEngine

    prompts, ref = greedy_reference
    lengths = [20 - i for i in range(len(prompts))]  # the batch shrinks one row a step at the end: 16, 8, 4, 2, 1
    engine = PagedEngine(tiny_model_path, block_size=4, decode_steps=4)
    runner = engine.runner
    runner.use_graphs = True

    def record(b):
        graph = _CpuStandInForCudaGraph(runner, b)
        return graph, graph.out

    runner._record_graph = record
    engine.pause("in_place")  # all admitted in one pass: the run starts at 11 rows
    try:
        params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
        out = _run(engine, prompts, params, resume=True)
        assert sorted(runner._graphs) == [1, 2, 4, 8, 16]
    finally:
        engine.shutdown()
    assert [r.output_ids for r in out] == [ref[i][:n] for i, n in enumerate(lengths)]


def test_requests_stopping_inside_a_run_of_continuous_steps(tiny_model_path, greedy_reference):
    """Requests that stop at different steps of a run of continuous decode steps (a stop token the host sees one
    step late, different max_new_tokens) end exactly where one-step-at-a-time decoding ends them, with the same
    log-probs; every block comes back, and a next turn from a stopped request's history finds its blocks cached and
    continues as transformers does."""
    from slime.engine.paged import PagedEngine

    prompts, ref = greedy_reference
    params = []
    for i, out in enumerate(ref):
        if i % 2:
            params.append(SamplingParams(max_new_tokens=3 + i, temperature=0.0, ignore_eos=True))
        else:  # stop at the first occurrence of the token at position 2 + i // 2
            params.append(SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=[out[2 + i // 2]]))
    results = {}
    for steps in (1, 5):
        engine = PagedEngine(tiny_model_path, block_size=4, decode_steps=steps)
        continued = _count_calls(engine.runner, "launch_next")
        try:
            out = _run(engine, prompts, params)
            engine.wait_idle(10)
            assert engine.scheduler.pool.free == engine.scheduler.pool.num_blocks - 1
            stopped = out[0]
            history = prompts[0] + stopped.output_ids + [11, 12, 13]
            before = engine.stats["prefix_shared_tokens"]
            second = _run(engine, [history], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))[0]
            shared = engine.stats["prefix_shared_tokens"] - before
        finally:
            engine.shutdown()
        assert (continued[0] > 0) == (steps > 1)
        assert shared == (len(prompts[0]) + len(stopped.output_ids) - 1) // 4 * 4
        assert second.output_ids == _generate_greedy(tiny_model_path, [history], 8)[0]
        results[steps] = out
    for i, (one, many) in enumerate(zip(results[1], results[5], strict=True)):
        expected = ref[i][: params[i].max_new_tokens]
        if params[i].stop_token_ids:
            expected = expected[: expected.index(params[i].stop_token_ids[0]) + 1]
        assert one.output_ids == many.output_ids == expected, f"prompt {i}"
        assert one.finish_reason == many.finish_reason
        assert torch.allclose(torch.tensor(one.logprobs), torch.tensor(many.logprobs), atol=1e-5)


def test_one_run_of_continuous_steps_outlives_requests_that_end_at_its_checkpoints(tiny_model_path):
    """Requests ending exactly where the run re-reserves blocks (every 4 steps here) do not stop the run: after the
    prefill, one launch and then steps launched from the device until the last request ends."""
    from slime.engine.paged import PagedEngine

    engine = PagedEngine(tiny_model_path, block_size=4, decode_steps=4)
    launches = _count_calls(engine.runner, "launch")
    lengths = [4, 8, 12, 30]
    engine.pause("in_place")  # all four admitted in the same pass
    try:
        params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
        out = _run(engine, [[7 + i, 8, 9] for i in range(4)], params, resume=True)
    finally:
        engine.shutdown()
    assert sorted(len(r.output_ids) for r in out) == lengths
    assert launches[0] == 1


def test_a_call_and_an_abort_reach_a_run_of_continuous_steps(tiny_model_path):
    """Steps that follow each other without returning to the engine loop still let a call for the engine thread run
    while requests decode (flush_cache refuses because they run, instead of waiting for their end), and an abort
    ends them with their partial output."""
    from slime.engine.paged import PagedEngine

    engine = PagedEngine(tiny_model_path, block_size=4, decode_steps=4)
    out = []
    try:
        for i in range(3):
            engine.submit([5 + i, 6, 7], SamplingParams(max_new_tokens=2000, ignore_eos=True), out.append, rid=str(i))
        deadline = time.monotonic() + 120
        while engine.stats["generated_tokens"] < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(RuntimeError, match="3 requests are running"):
            engine.flush_cache()
        assert engine.abort(abort_all=True) == 3
        engine.wait_idle(60)
    finally:
        engine.shutdown()
    assert len(out) == 3 and all(r.finish_reason["type"] == "abort" for r in out)
    assert all(20 <= len(r.output_ids) < 2000 for r in out)


def test_a_next_turn_reuses_the_last_turns_blocks_and_generates_the_same(tiny_model_path):
    """A multi-turn agent sends its history again with new tokens: the blocks its last turn computed (prompt and
    decoded output) are found in the prefix cache after that request finished, and the output equals transformers'
    greedy continuation of the whole history."""
    from slime.engine.paged import PagedEngine

    torch.manual_seed(3)
    prompt = torch.randint(10, 2000, (37,)).tolist()
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    engine = PagedEngine(tiny_model_path, block_size=4)
    try:
        first = _run(engine, [prompt], greedy)[0]
        history = prompt + first.output_ids + [11, 12, 13]
        before = engine.stats["prefix_shared_tokens"]
        second = _run(engine, [history], greedy)[0]
        shared = engine.stats["prefix_shared_tokens"] - before
    finally:
        engine.shutdown()
    assert shared == (len(prompt) + len(first.output_ids) - 1) // 4 * 4  # every full block turn 1 computed
    assert second.cached_tokens == shared
    assert second.output_ids == _generate_greedy(tiny_model_path, [history], 24)[0]

    engine = PagedEngine(tiny_model_path, block_size=4, prefix_cache=False)  # --disable-radix-cache
    try:
        again = _run(engine, [prompt, prompt, history], greedy)
        assert engine.stats["prefix_shared_tokens"] == 0 and again[2].cached_tokens == 0
    finally:
        engine.shutdown()
    assert again[0].output_ids == again[1].output_ids == first.output_ids and again[2].output_ids == second.output_ids


def test_engine_memory_falls_back_where_the_driver_refuses_fixed_addresses(tiny_model_path, monkeypatch, caplog):
    """Where CUDA's virtual memory calls fail (an old driver, a virtualised GPU), the engine allocates its weights
    and cache as usual and says so, instead of failing to start; releases then drop its graphs."""
    from slime.engine import device_memory
    from slime.engine.paged import PagedEngine

    def refuse(self, nbytes, device):
        raise RuntimeError("cuMemCreate failed: CUDA_ERROR_NOT_SUPPORTED (801)")

    monkeypatch.setattr(device_memory, "available", lambda device: True)
    monkeypatch.setattr(device_memory.DeviceRegion, "__init__", refuse)
    with caplog.at_level(logging.WARNING, logger="slime.engine.device_memory"):
        engine = PagedEngine(tiny_model_path, block_size=4)
    try:
        assert engine._weight_region is None and engine.runner.kv_region is None and not engine._movable()
        out = _run(engine, [[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
        assert len(out[0].output_ids) == 3
    finally:
        engine.shutdown()
    assert "the weights at a fixed address failed" in caplog.text
    assert "the KV cache at a fixed address failed" in caplog.text


POISON = 3  # a token id no reference prompt holds (they are drawn from 10 .. 2000)


@pytest.mark.parametrize("backend,where", [("paged", "prefill"), ("paged", "decode"), ("padded", "prefill")])
def test_a_request_that_breaks_a_step_fails_alone(tiny_model_path, greedy_reference, backend, where):
    """One request makes every step it is in raise (its first token, in prefill or in decode). It fails alone, with
    a 500 naming the error; the requests that shared its steps are retried alone, then batched again, and finish
    with exactly the tokens they would have produced anyway."""
    from slime.engine.padded import PaddedEngine
    from slime.engine.paged import PagedEngine

    prompts, ref = greedy_reference
    bad = [POISON] + prompts[2] if where == "prefill" else prompts[2] + [POISON]
    mixed = prompts[:5] + [bad] + prompts[5:8]
    engine = PagedEngine(tiny_model_path, block_size=4) if backend == "paged" else PaddedEngine(tiny_model_path)

    def poisoned(fn, tokens_of):
        def wrapper(*args, **kw):
            if POISON in tokens_of(*args, **kw):
                raise RuntimeError("poisoned request in this step")
            return fn(*args, **kw)

        return wrapper

    if backend == "padded":
        engine.model.forward = poisoned(engine.model.forward, lambda **kw: kw["input_ids"].flatten().tolist())
    elif where == "prefill":
        engine.runner.prefill = poisoned(engine.runner.prefill, lambda ids, *a: ids)
    else:
        engine.runner.decode = poisoned(engine.runner.decode, lambda last, *a: last)
    try:
        out = _run(engine, mixed, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
        again = _run(engine, prompts[:3], SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
    finally:
        engine.shutdown()
    failed = out.pop(5)
    assert failed.finish_reason["type"] == "abort" and failed.finish_reason["status_code"] == 500
    assert "poisoned request in this step" in failed.finish_reason["message"]
    for i, r in enumerate(out + again):
        assert r.finish_reason["type"] == "length" and r.output_ids == (ref[:5] + ref[5:8] + ref[:3])[i], i
    assert engine.stats["failed_steps"] >= 2  # the batched step, then the poisoned request alone
    assert engine.stats["aborted_requests"] == 1


def test_sampled_logprobs_match_a_forward_pass(tiny_model_path):
    """Sampled tokens' logprobs (temperature 1, top-p through the eager sampler) equal the log-softmax of a plain
    transformers forward over prompt + response: the paged cache holds the right keys for every position."""
    from transformers import AutoModelForCausalLM

    from slime.engine.paged import PagedEngine

    torch.manual_seed(2)
    prompts = [torch.randint(10, 2000, (n,)).tolist() for n in (5, 23)] * 2
    engine = PagedEngine(tiny_model_path, block_size=4, seed=3)
    try:
        out = _run(engine, prompts, SamplingParams(max_new_tokens=30, temperature=1.0, ignore_eos=True))
        out += _run(engine, prompts[:1], SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9))
    finally:
        engine.shutdown()
    engine = PagedEngine(tiny_model_path, block_size=4, decode_steps=4)  # sampled inside the step, steps back to back
    try:
        out += _run(engine, prompts, SamplingParams(max_new_tokens=30, temperature=0.7, ignore_eos=True))
    finally:
        engine.shutdown()
    prompts = prompts + prompts[:1] + prompts
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    for k, (p, r) in enumerate(zip(prompts, out, strict=True)):
        ids = torch.tensor([p + r.output_ids])
        with torch.inference_mode():
            lp = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].double() / (0.7 if k >= 5 else 1.0), -1)
        ref = lp.gather(1, ids[0, len(p) :, None])[:, 0]
        assert torch.allclose(torch.tensor(r.logprobs, dtype=torch.float64), ref, atol=1e-4)


def test_prompt_larger_than_the_cache_is_refused(tiny_model_path):
    from slime.engine.paged import PagedEngine

    engine = PagedEngine(tiny_model_path, block_size=4, kv_cache_tokens=32)
    try:
        (r,) = _run(engine, [list(range(10, 60))], SamplingParams(max_new_tokens=4))
        assert r.finish_reason["type"] == "abort" and "does not fit the KV cache" in r.finish_reason["message"]
        (ok,) = _run(engine, [list(range(10, 20))], SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert len(ok.output_ids) == 4
    finally:
        engine.shutdown()


def test_the_cpu_cache_fits_half_the_available_memory(tiny_model_path, monkeypatch):
    """On CPU the pool is 2048 tokens per row unless that exceeds half of the host memory available: many rows
    (256 by default on CPU) of long requests must not be able to exhaust the machine."""
    from slime.engine import model_runner
    from slime.engine.paged import PagedEngine

    monkeypatch.setattr(model_runner, "_available_bytes", lambda: 64 << 20)
    engine = PagedEngine(tiny_model_path, block_size=4, max_running_requests=512)
    try:
        r = engine.runner
        per_token = 2 * r.num_layers * r.kv_heads * r.head_dim * 4  # float32
        assert r._kv.shape[2] <= (32 << 20) // per_token + 2 * 4 < 512 * 2048  # capped, not 2048 per row
        (ok,) = _run(engine, [list(range(10, 20))], SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert len(ok.output_ids) == 4
    finally:
        engine.shutdown()


@pytest.mark.parametrize("backend", ["paged", "padded"])
def test_torch_work_runs_on_the_engine_thread(tiny_model_path, backend):
    """Loading, the KV cache, weight updates and memory release run on the engine thread even when called from
    another: a second thread running parallel ops makes OpenMP stop spin-waiting, which cost a fifth of the CPU
    throughput. Errors raised there reach the caller, and the engine keeps serving."""
    from slime.engine.padded import PaddedEngine
    from slime.engine.paged import PagedEngine

    seen = []
    base = PagedEngine if backend == "paged" else PaddedEngine

    class Recording(base):
        def _setup(self):
            seen.append(("setup", threading.current_thread().name))
            super()._setup()

        def _load_weights(self, named_tensors, weight_version):
            seen.append(("load_weights", threading.current_thread().name))
            return super()._load_weights(named_tensors, weight_version)

        def _release_memory(self, tags):
            seen.append(("release", threading.current_thread().name))
            return super()._release_memory(tags)

        def _resume_memory(self, tags):
            seen.append(("resume", threading.current_thread().name))
            return super()._resume_memory(tags)

    engine = Recording(tiny_model_path)
    try:
        params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
        before = _run(engine, [[11, 12, 13]], params)[0].output_ids
        weights = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
        engine.release_memory(None)
        engine.resume_memory(None)  # weights come back empty: the update below fills them
        assert engine.update_weights(weights.items(), "v2") == len(weights)
        with pytest.raises(KeyError, match="not_a_weight"):
            engine.update_weights([("not_a_weight", torch.zeros(1))], None)
        engine.resume()
        assert _run(engine, [[11, 12, 13]], params)[0].output_ids == before
        assert engine.weight_version == "v2"
    finally:
        engine.shutdown()
    assert [what for what, _ in seen] == ["setup", "release", "resume", "load_weights", "load_weights"]
    assert {thread for _, thread in seen} == {"embedded-engine"}
    with pytest.raises(RuntimeError, match="shut down"):
        engine.update_weights([], None)


def test_load_errors_reach_the_constructor(tiny_model_path, tmp_path):
    """The model loads on the engine thread; a refusal there is raised by the constructor, naming the way out."""
    import json
    import shutil

    from slime.engine.paged import PagedEngine

    path = shutil.copytree(tiny_model_path, tmp_path / "sliding")
    config = json.loads((path / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--backend padded"):
        PagedEngine(str(path))


def _tiny_model(smollm2_path: str, out, model_type: str, **overrides) -> str:
    """A random 2-layer model of `model_type` with SmolLM2's tokenizer, saved to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        **overrides,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _greedy_matches_generate(engine, path: str) -> None:
    torch.manual_seed(1)
    prompts = [torch.randint(10, 2000, (n,)).tolist() for n in (1, 6, 19, 19)]
    out = _run(engine, prompts, SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))
    assert [r.output_ids for r in out] == _generate_greedy(path, prompts, 10)


@pytest.mark.parametrize(
    "model_type,overrides,cache_shape",
    [
        ("gpt_neox", {"num_key_value_heads": 2, "rotary_pct": 0.25}, (4, 16)),  # a stale key the model ignores
        ("qwen3", {"num_key_value_heads": 2, "head_dim": 32}, (2, 32)),  # head dim != hidden / heads; q/k norms
        ("phi3", {"num_key_value_heads": 2}, (2, 16)),  # fused qkv projection
    ],
)
def test_paged_engine_serves_other_architectures(smollm2_path, tmp_path, model_type, overrides, cache_shape):
    """The cache's (kv heads, head dim) come from what the attention receives, not from config keys; greedy decoding
    equals transformers `generate`."""
    from slime.engine.paged import PagedEngine

    path = _tiny_model(smollm2_path, tmp_path / model_type, model_type, **overrides)
    engine = PagedEngine(path, block_size=4)
    try:
        assert (engine.runner.kv_heads, engine.runner.head_dim) == cache_shape
        _greedy_matches_generate(engine, path)
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "model_type,overrides,reason",
    [
        ("stablelm", {"num_key_value_heads": 2}, "do not receive the forward's keyword arguments"),
        (
            "deepseek_v3",
            {
                "num_key_value_heads": 4,
                "q_lora_rank": None,
                "kv_lora_rank": 16,
                "qk_rope_head_dim": 8,
                "qk_nope_head_dim": 16,
                "v_head_dim": 16,
                "first_k_dense_replace": 2,
            },
            "keys have head dim 24, values 16",
        ),
        ("mistral", {"num_key_value_heads": 2, "sliding_window": 64}, "sliding_window"),
    ],
)
def test_auto_backend_falls_back_to_padded(smollm2_path, tmp_path, model_type, overrides, reason):
    """A model whose attention the paged engine does not implement: --backend paged refuses it naming why and the way
    out; auto (the default) serves it with the padded backend, which decodes it exactly."""
    from slime.engine.paged import PagedEngine
    from slime.engine.paged_attention import PagedUnsupported
    from slime.engine.server import build_engine, parse_args

    path = _tiny_model(smollm2_path, tmp_path / model_type, model_type, **overrides)
    with pytest.raises(PagedUnsupported, match=reason) as refused:
        PagedEngine(path)
    assert "--rollout-engine-backend padded" in str(refused.value)
    args = parse_args(["--model-path", path])
    assert args.backend == "auto"
    engine = build_engine(args, path, {})
    try:
        assert engine.backend == "padded" and reason in engine.backend_note
        _greedy_matches_generate(engine, path)
    finally:
        engine.shutdown()


def test_requests_queued_together_share_one_prefill_pass(tiny_model_path):
    """submit_many (a batch /generate) queues its requests at once: the first prefill pass admits all of them (queued
    one by one, the engine thread could wake at the first and prefill it alone)."""
    from slime.engine.paged import PagedEngine

    engine = PagedEngine(tiny_model_path, block_size=4, max_running_requests=16, max_prefill_tokens=4096)
    passes = _count_calls(engine.runner, "prefill")
    done, out = threading.Event(), []

    def finished(r) -> None:
        out.append(r)
        if len(out) == 12:
            done.set()

    try:
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        engine.submit_many([([7 + i, 8, 9, 10 + i], params, finished, str(i)) for i in range(12)])
        assert done.wait(120)
        assert passes[0] == 1 and all(len(r.output_ids) == 3 for r in out)
        with pytest.raises(ValueError):  # one bad request: none of the batch is queued
            engine.submit_many([([7, 8], params, finished, "ok"), ([], params, finished, "empty")])
        assert engine.loads() == {"num_running_reqs": 0, "num_waiting_reqs": 0}
    finally:
        engine.shutdown()


def test_masked_attention_for_cuda_repeats_grouped_heads_correctly():
    """The CUDA prefill attention (memory-efficient kernel, which takes no grouped key-value heads) repeats each
    key-value head for its group of query heads: the same result as grouped-query SDPA, here through the math
    kernel on CPU."""
    from slime.engine.paged_attention import _masked_attention_cuda

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 5, 16), torch.randn(3, 2, 12, 16), torch.randn(3, 2, 12, 16)
    mask = torch.rand(3, 1, 5, 12) > 0.3
    mask[..., 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(_masked_attention_cuda(q, k, v, mask, 0.25), want, rtol=1e-5, atol=1e-5)
