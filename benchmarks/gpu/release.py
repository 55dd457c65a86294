"""Colocated release / resume cycles of the paged engine on one GPU: what a rollout costs after the engine gave its
memory to a trainer and took it back.

Usage (repo root, on the GPU machine): python benchmarks/gpu/release.py TOKENIZER_DIR OUT_DIR [--models a,b]
Writes OUT_DIR/release.json; exits 1 when a check fails.

Per model shape (random weights, bf16, in-process engine, --mem-fraction-static 0.6 as a colocated run sets it):
a rollout of 256 prompts x 128 tokens with new-token caps spread over 20..256 (so the batch shrinks through many
graph buckets), then three cycles of: release all memory -> a stand-in trainer allocates 90 % of what was freed ->
resume the weights -> a weight update from a saved copy -> resume the KV cache -> the same rollout. Reported per
cycle: release / resume seconds, GPU memory freed (device-wide), the rollout's seconds and tokens/s, and how many
decode graphs were captured in it (engine stat `graph_captures`; absent in engines that predate it).
Checks: the memory freed covers the weights and the KV cache; greedy output after the cycles equals the output
before; with fixed-address memory (slime.engine.device_memory) no graph is captured after the first rollout.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import MODELS, build_model, run_section  # noqa: E402

from slime.engine.paged import PagedEngine  # noqa: E402
from slime.engine.sampling import SamplingParams  # noqa: E402
from tests.engine.test_paged_engine import _run  # noqa: E402

PROMPTS, PROMPT_LEN = 256, 128


def rollout(engine, prompts: list[list[int]], caps: list[int]) -> tuple[int, float]:
    import threading

    done, out = threading.Event(), []

    def cb(r):
        out.append(len(r.output_ids))
        if len(out) == len(prompts):
            done.set()

    start = time.perf_counter()
    for i, (p, cap) in enumerate(zip(prompts, caps, strict=True)):
        engine.submit(p, SamplingParams(max_new_tokens=cap, temperature=1.0, ignore_eos=True), cb, rid=f"r{i}")
    assert done.wait(600), "rollout did not finish"
    return sum(out), time.perf_counter() - start


def greedy(engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    return [r.output_ids for r in _run(engine, prompts, params)]


def cycles(path: str, vocab: int) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(100, min(vocab, 49152)) for _ in range(PROMPT_LEN)] for _ in range(PROMPTS)]
    caps = [rng.randint(20, 256) for _ in range(PROMPTS)]
    engine = PagedEngine(path, dtype="bfloat16", device="cuda", max_running_requests=512, mem_fraction_static=0.6)
    stat = engine.stats.get
    try:
        saved = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
        before_greedy = greedy(engine, prompts[:8])
        first = rollout(engine, prompts, caps)
        out = {"first_rollout": {"tokens": first[0], "seconds": first[1], "graph_captures": stat("graph_captures")}}
        runs = []
        for _ in range(3):
            row: dict = {}
            torch.cuda.synchronize()
            free0 = torch.cuda.mem_get_info()[0]
            t = time.perf_counter()
            engine.release_memory()
            row["release_seconds"] = time.perf_counter() - t
            freed = torch.cuda.mem_get_info()[0] - free0
            row["freed_gb"] = freed / 1e9
            trainer = torch.empty(int(freed * 0.9), dtype=torch.uint8, device="cuda")  # the trainer's turn
            trainer.fill_(1)
            del trainer
            torch.cuda.empty_cache()
            t = time.perf_counter()
            engine.resume_memory(["weights"])
            row["resume_weights_seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            engine.update_weights(list(saved.items()), "next")
            engine.resume()  # a sync ends with /continue_generation
            row["update_seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            engine.resume_memory(["kv_cache"])
            row["resume_kv_seconds"] = time.perf_counter() - t
            captures0, capture_s0 = stat("graph_captures"), stat("graph_capture_seconds")
            tokens, seconds = rollout(engine, prompts, caps)
            row |= {"rollout_tokens": tokens, "rollout_seconds": seconds, "tokens_per_s": tokens / seconds}
            if captures0 is not None:
                row["graph_captures"] = stat("graph_captures") - captures0
                row["graph_capture_seconds"] = stat("graph_capture_seconds") - capture_s0
            runs.append(row)
        out["cycles"] = runs
        out["greedy_same_after_cycles"] = greedy(engine, prompts[:8]) == before_greedy
        out["weights_gb"] = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 1e9
        out["kv_gb"] = engine.runner._kv.nbytes / 1e9
        out["fixed_addresses"] = getattr(engine.runner, "kv_region", None) is not None
        return out
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def failed_checks(r: dict) -> list[str]:
    bad = []
    for name, m in r.items():
        if not isinstance(m, dict) or "error" in m:
            bad.append(f"{name}: {m.get('error') if isinstance(m, dict) else m}")
            continue
        if not m["greedy_same_after_cycles"]:
            bad.append(f"{name}: greedy output changed across release/resume")
        for i, c in enumerate(m["cycles"]):
            if c["freed_gb"] < 0.9 * (m["weights_gb"] + m["kv_gb"]):
                bad.append(f"{name} cycle {i}: freed {c['freed_gb']:.2f} GB of {m['weights_gb'] + m['kv_gb']:.2f}")
            if m["fixed_addresses"] and c.get("graph_captures"):
                bad.append(f"{name} cycle {i}: {c['graph_captures']} graphs captured again")
    return bad


def main() -> None:
    tok, out_dir = sys.argv[1], Path(sys.argv[2])
    names = sys.argv[sys.argv.index("--models") + 1].split(",") if "--models" in sys.argv else list(MODELS)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    path = out_dir / "release.json"
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            model = build_model(name, tok, os.path.join(work, name))
            run_section(results, path, name, cycles, model, MODELS[name]["vocab_size"])
    bad = failed_checks({k: v for k, v in results.items() if k in MODELS})
    print("FAILED: " + "; ".join(bad) if bad else "all checks passed", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
