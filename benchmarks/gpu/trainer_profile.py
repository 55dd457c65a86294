"""Where the trainer's GPU time goes: one rollout's training under torch.profiler, kernels grouped by kind.

Usage (repo root, on the GPU machine): python benchmarks/gpu/trainer_profile.py TOKENIZER_DIR OUT_DIR [MODEL]
MODEL: qwen3-0.6b (default) or smollm2-135m. Same batch and best configuration as benchmarks/gpu/trainer.py (packed
attention, 32k-token micro-batches, fused AdamW). Writes OUT_DIR/trainer_profile_<MODEL>.json: wall seconds, summed
kernel seconds per kind (matmul, attention, elementwise, reduction/norm, optimizer, copy, other), the GPU's busy
fraction (kernel time over wall time; kernels do not overlap on one stream) and the 30 longest kernels.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.gpu.run import MODELS, build_model  # noqa: E402
from benchmarks.gpu.trainer import flops, load, one_rollout, rl_batch  # noqa: E402

KINDS = [  # first match wins
    ("attention", r"flash|fmha|attention|sdpa"),
    ("matmul", r"gemm|cutlass|sm90_xmma|nvjet|matmul|cublas"),
    ("optimizer", r"adam|multi_tensor"),
    ("copy", r"memcpy|memset|copy_|CatArrayBatched"),
    ("reduction/norm", r"reduce|norm|softmax|logsumexp|sum_kernel|mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|mul|add|pow|rsqrt|neg|exp|where|fill"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, low)), "other")


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    tokenizer_dir, out = sys.argv[1], sys.argv[2]
    name = sys.argv[3] if len(sys.argv) > 3 else "qwen3-0.6b"
    os.makedirs(out, exist_ok=True)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    torch.cuda.set_device(0)
    path = build_model(name, tokenizer_dir, os.path.join(tempfile.mkdtemp(prefix="profile-"), name))
    tokens, responses = rl_batch(MODELS[name]["vocab_size"])
    model, opt = load(path, "slime_packed", True, False)
    one_rollout(model, opt, tokens, responses, 32768, 65536)  # warm-up
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        one_rollout(model, opt, tokens, responses, 32768, 65536)
        wall = time.perf_counter() - start
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e6)
    by_kind: dict[str, float] = {}
    for k, times in kernels.items():
        by_kind[kind_of(k)] = by_kind.get(kind_of(k), 0.0) + sum(times)
    busy = sum(by_kind.values())
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:30]
    result = {
        "model": name,
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": wall,
        "tflop": flops(path, tokens, responses) / 1e12,
        "kernel_seconds": busy,
        "gpu_busy_fraction": busy / wall,
        "kernel_launches": sum(len(t) for t in kernels.values()),
        "seconds_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": k[:160], "kind": kind_of(k), "seconds": sum(t), "calls": len(t)} for k, t in top],
    }
    ops = prof.key_averages(group_by_input_shape=True)
    result["top_ops"] = [
        {"op": e.key, "shapes": str(e.input_shapes)[:200], "cuda_seconds": e.self_device_time_total / 1e6,
         "calls": e.count}
        for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:40]
    ]  # fmt: skip
    Path(out, f"trainer_profile_{name}.json").write_text(json.dumps(result, indent=1))
    for t in result["top_ops"]:
        print(f"{t['cuda_seconds']:8.3f}s {t['calls']:6d}x {t['op'][:40]:40s} {t['shapes'][:110]}")
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}, indent=1))
    for t in result["top_kernels"][:15]:
        print(f"{t['seconds']:8.3f}s {t['calls']:6d}x {t['kind']:14s} {t['name'][:100]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
