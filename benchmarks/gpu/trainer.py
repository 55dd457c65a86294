"""The trainer alone on one GPU: tokens/s and MFU on RL-shaped batches, configuration against configuration in one
run, and the colocated offload/onload time.

Usage (repo root, on the GPU machine): python benchmarks/gpu/trainer.py TOKENIZER_DIR OUT_DIR [--offload-only]
    [--models a,b] [--configs TEXT] (only the configurations whose label contains TEXT)
Writes OUT_DIR/trainer_benchmark.json after every measurement. One rank (FSDP2 over a mesh of one), bf16 compute
with fp32 master weights, random weights of the Qwen3-0.6B and SmolLM2-135M shapes (benchmarks/gpu/run.py).

A rollout here is 128 samples: prompts of 64-512 tokens and log-normal responses of 20-3,600 tokens (RL's long
tail), 100-4,000 tokens in all. One measurement = what the trainer does with one rollout: the no-gradient log-prob
pass, then forward+backward of every micro-batch and one AdamW step. FLOPs are counted as issued: linear layers at
every position, the LM head only at response positions (the only rows that reach it), causal attention within each
sample; x4 (log-prob pass 1, forward 1, backward 2). MFU is against the bf16 matmul peak measured at the start.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu.run import MODELS, bf16_peak, build_model, finish  # noqa: E402
from slime.trainer import log_probs  # noqa: E402
from slime.trainer import models as trainer_models  # noqa: E402
from slime.trainer.offload import HostOffload, resident_tensors  # noqa: E402
from slime.trainer.packing import forward_log_probs, split_micro_batches  # noqa: E402

SAMPLES = 128
MFU_TARGET = {"qwen3-0.6b": 0.35, "smollm2-135m": 0.20}
OFFLOAD_TARGET_S = 0.3  # offload + onload, 0.6B shape


def rl_batch(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    tokens, responses = [], []
    for _ in range(SAMPLES):
        prompt = rng.randint(64, 512)
        response = min(3600, max(20, int(rng.lognormvariate(5.8, 0.9))))
        response = min(response, 4000 - prompt)
        tokens.append([rng.randrange(100, min(vocab, 49152)) for _ in range(prompt + response)])
        responses.append(response)
    return tokens, responses


def flops(path: str, tokens: list[list[int]], responses: list[int]) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings().weight.numel()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_pair = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim
    fwd = sum(
        2 * body * len(t) + 2 * head * r + per_pair * len(t) * (len(t) + 1) / 2
        for t, r in zip(tokens, responses, strict=True)
    )
    return 4 * fwd


def load(path: str, attention: str, fused: bool, compile_layers: bool | str):
    from torch.distributed.device_mesh import init_device_mesh

    original = trainer_models.attention_for
    trainer_models.attention_for = lambda p: attention  # the configuration under test
    try:
        mesh = init_device_mesh("cuda", (1,))
        model = trainer_models.load_policy(path, torch.device("cuda"), mesh, True)
    finally:
        trainer_models.attention_for = original
    if compile_layers == "pointwise":
        trainer_models.compile_pointwise(model)
    elif compile_layers:
        for m in model.modules():
            if type(m).__name__ in set(model._no_split_modules or []):
                m.compile(dynamic=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused)
    return model, opt


def one_rollout(model, opt, tokens, responses, budget: int, no_grad_budget: int, ready=None) -> float:
    lengths = [len(t) for t in tokens]
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        for mb in split_micro_batches(lengths, 1, no_grad_budget):
            forward_log_probs(model, [tokens[i] for i in mb], [responses[i] for i in mb], 1.0)
    total = sum(responses)
    for mb in split_micro_batches(lengths, 1, budget):
        out = forward_log_probs(model, [tokens[i] for i in mb], [responses[i] for i in mb], 1.0, entropy_grad=True)
        loss = -(out["log_probs"].sum() + 0.01 * out["entropy"].sum()) / total
        loss.backward()
    if ready is not None:  # an onload's late optimizer state must have arrived
        ready()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def offload_roundtrip(model, opt, step=None) -> dict:
    """Rounds of offload -> empty_cache -> onload, two ways per round: "plain" (everything copied back before
    onload returns) and "late" (what the trainer does: the optimizer state offloaded as `late`, its copy begun
    right after the step, and copied back on a side stream while the next step's passes run). With `step` (a
    function running one rollout's training) each move is followed by a step, timed, to show what the late copies
    cost it; steady rounds are those after round 0."""
    host = HostOffload()
    out = {}
    for i in range(3):  # the first offload allocates and pins the host buffers; later ones reuse them
        for mode in ("plain", "late"):
            params, states = resident_tensors([model], []), resident_tensors([], [opt])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if mode == "late":
                host.begin_offload(states)
                moved = host.offload(params, late=states)
            else:
                moved = host.offload(params + states)
            t_copy = time.perf_counter()
            torch.cuda.empty_cache()
            t1 = time.perf_counter()
            host.onload()
            t2 = time.perf_counter()
            row = {
                "gb": moved / 1e9, "offload_s": t1 - t0, "onload_s": t2 - t1, "total_s": t2 - t0,
                "copy_s": t_copy - t0, "empty_cache_s": t1 - t_copy,
            }  # fmt: skip
            if step is not None:
                row["step_after_s"] = step(host.ready)
            host.ready()
            out[f"round_{i}_{mode}"] = row
    return out


CONFIGS = {
    # name: attention, train token budget, no-grad budget, fused AdamW, compiled layers, fused log-prob kernels
    # (the sdpa-mask and 4k/16k-budget configurations of 2026-12-01 are in docs/benchmarks.md)
    "packed, 32k, fused adam": ("slime_packed", 32768, 65536, True, False, False),
    "packed, 32k, fused adam, fused log-probs": ("slime_packed", 32768, 65536, True, False, True),
    "packed, 32k, fused adam, fused log-probs, compiled layers": ("slime_packed", 32768, 65536, True, True, True),
    "packed, 32k, fused adam, fused log-probs, compiled pointwise": (
        "slime_packed",
        32768,
        65536,
        True,
        "pointwise",
        True,
    ),  # fmt: skip
    # fewer, larger micro-batches: fewer kernel launches per token for a model too small to keep the GPU busy
    "packed, 64k, fused adam, fused log-probs, compiled layers": ("slime_packed", 65536, 131072, True, True, True),
    "packed, 128k, fused adam, fused log-probs, compiled layers": ("slime_packed", 131072, 131072, True, True, True),
}
OFFLOAD_AFTER = "packed, 32k, fused adam, fused log-probs"


def log_probs_kernel_check(rows: int = 2048, vocab: int = 151936) -> dict:
    """The fused Triton log-prob/entropy kernels against the chunked torch version: errors of both against float64
    autograd (bf16 logits, temperature 0.7, gradients through log-probs and entropy) and forward+backward time."""
    from slime.trainer import log_probs as lp

    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    gl, ge = torch.randn(rows, device="cuda"), torch.randn(rows, device="cuda")
    x = logits.detach().double().requires_grad_()
    log_p = torch.log_softmax(x / 0.7, -1)
    ref_lp, ref_ent = log_p.gather(1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
    (ref_lp * gl.double() + ref_ent * ge.double()).sum().backward()
    out = {"rows": rows, "vocab": vocab}
    for fused in (False, True):
        lp.FUSED_ON_CUDA = fused

        def step():
            logits.grad = None
            a, e = lp.token_log_probs(logits, targets, 0.7, entropy_grad=True)
            (a * gl + e * ge).sum().backward()
            return a, e

        a, e = step()
        errors = {
            "log_prob_max_abs_error": (a.double() - ref_lp).abs().max().item(),
            "entropy_max_abs_error": (e.double() - ref_ent).abs().max().item(),
            "grad_max_abs_error": (logits.grad.double() - x.grad).abs().max().item(),
        }
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        out["fused" if fused else "chunked"] = errors | {"seconds": (time.perf_counter() - start) / 5}
    lp.FUSED_ON_CUDA = True
    out["speedup"] = out["chunked"]["seconds"] / out["fused"]["seconds"]
    return out


def main() -> None:
    tokenizer_dir, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    torch.cuda.set_device(0)
    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    results["bf16_peak_tflops"] = peak = bf16_peak() / 1e12
    path_out = Path(out) / "trainer_benchmark.json"
    work = tempfile.mkdtemp(prefix="trainer-bench-")
    if "--offload-only" in sys.argv:  # the offload round trip after the best configuration's training, alone
        name = "qwen3-0.6b"
        path = build_model(name, tokenizer_dir, os.path.join(work, name))
        tokens, responses = rl_batch(MODELS[name]["vocab_size"])
        model, opt = load(path, "slime_packed", True, "pointwise")
        for _ in range(2):
            one_rollout(model, opt, tokens, responses, 32768, 65536)
        results["step_without_offload_s"] = one_rollout(model, opt, tokens, responses, 32768, 65536)
        results["offload"] = offload_roundtrip(
            model, opt, functools.partial(one_rollout, model, opt, tokens, responses, 32768, 65536)
        )
        results["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        print(json.dumps(results, indent=1))
        path_out.write_text(json.dumps(results, indent=1))
        return
    results["log_probs_kernel"] = check = log_probs_kernel_check()
    print("log_probs_kernel", json.dumps(check), flush=True)
    only = sys.argv[sys.argv.index("--configs") + 1] if "--configs" in sys.argv else ""  # labels containing it
    names = sys.argv[sys.argv.index("--models") + 1].split(",") if "--models" in sys.argv else list(MODELS)
    for name in names:
        path = build_model(name, tokenizer_dir, os.path.join(work, name))
        tokens, responses = rl_batch(MODELS[name]["vocab_size"])
        f = flops(path, tokens, responses)
        entry = results[name] = {"tokens": sum(map(len, tokens)), "response_tokens": sum(responses), "tflop": f / 1e12}
        for label, (attention, budget, ng_budget, fused, compiled, fused_log_probs) in CONFIGS.items():
            if only not in label:
                continue
            try:
                log_probs.FUSED_ON_CUDA = fused_log_probs
                torch.cuda.reset_peak_memory_stats()
                model, opt = load(path, attention, fused, compiled)
                warm = one_rollout(model, opt, tokens, responses, budget, ng_budget)
                seconds = min(one_rollout(model, opt, tokens, responses, budget, ng_budget) for _ in range(2))
                entry[label] = {
                    "seconds": seconds,
                    "warmup_seconds": warm,
                    "tokens_per_s": entry["tokens"] / seconds,
                    "mfu": f / seconds / (peak * 1e12),
                    "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
                }
                if label == OFFLOAD_AFTER:
                    entry["offload"] = offload_roundtrip(model, opt)
                    entry[label]["after_offload_seconds"] = one_rollout(
                        model, opt, tokens, responses, budget, ng_budget
                    )
                del model, opt
            except Exception as exc:  # noqa: BLE001 - record and go on
                entry[label] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "tb": traceback.format_exc()[-3000:]}
            torch.cuda.empty_cache()
            print(name, label, json.dumps(entry[label])[:400], flush=True)
            path_out.write_text(json.dumps(results, indent=1))
    log_probs.FUSED_ON_CUDA = True
    checks = []
    for key in ("log_prob_max_abs_error", "entropy_max_abs_error", "grad_max_abs_error"):
        if check["fused"][key] > 2 * check["chunked"][key] + 1e-6:
            checks.append(f"fused log-prob kernels: {key} {check['fused'][key]:.2e} vs {check['chunked'][key]:.2e}")
    for name, target in MFU_TARGET.items():
        if name not in results:
            continue
        best = max((v.get("mfu", 0) for v in results[name].values() if isinstance(v, dict)), default=0)
        results[name]["best_mfu"] = best
        if best < target:
            checks.append(f"{name}: best MFU {best:.1%} < {target:.0%}")
    rounds = results.get("qwen3-0.6b", {}).get("offload", {})
    if rounds and rounds["round_2_late"]["total_s"] > OFFLOAD_TARGET_S:
        checks.append(f"qwen3-0.6b offload+onload {rounds['round_2_late']['total_s']:.3f} s > {OFFLOAD_TARGET_S} s")
    print(json.dumps(results, indent=1))
    dist.destroy_process_group()
    finish(results, path_out, checks)


if __name__ == "__main__":
    main()
