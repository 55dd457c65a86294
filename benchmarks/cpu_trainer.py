"""The trainer on this CPU: forward+backward tokens/s of the real SmolLM2-135M-Instruct, one FSDP2 rank (gloo),
configuration against configuration in one process (the machine is noisy: compare within a run).

Usage: .venv/bin/python benchmarks/cpu_trainer.py [--threads 2] [--rounds 3] [--out FILE]
Workload: 64 samples of a GRPO step on the demo's data: prompts of 60-90 tokens, 64-token responses (~9k tokens),
what one optimizer step of the TRL comparison trains on. Per configuration: one warm-up pass, then the best of
`rounds` passes of forward+backward over all micro-batches (no optimizer step: the same in every configuration).
Configurations: transformers' SDPA with its packed-row masks (the trainer before packed attention), packed
attention in float32, packed attention in bfloat16 compute (float32 weights), at two token budgets.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slime.trainer import models  # noqa: E402
from slime.trainer.packing import forward_log_probs, split_micro_batches  # noqa: E402

CONFIGS = {  # name: attention, compute dtype, token budget
    "sdpa masks, float32, 512": ("sdpa", torch.float32, 512),
    "packed, float32, 512": ("slime_packed", torch.float32, 512),
    "packed, float32, 2048": ("slime_packed", torch.float32, 2048),
    "packed, bfloat16, 512": ("slime_packed", torch.bfloat16, 512),
    "packed, bfloat16, 2048": ("slime_packed", torch.bfloat16, 2048),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from torch.distributed.device_mesh import init_device_mesh

    from slime.hub.provision import resolve_checkpoint

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    path = resolve_checkpoint("SmolLM2-135M-Instruct")
    rng = random.Random(0)
    tokens = [[rng.randrange(100, 40000) for _ in range(rng.randint(60, 90) + 64)] for _ in range(64)]
    responses = [64] * len(tokens)
    lengths = [len(t) for t in tokens]
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": a.threads, "tokens": sum(lengths)}
    original = models.attention_for
    for name, (attention, dtype, budget) in CONFIGS.items():
        models.attention_for = lambda _path, attention=attention: attention
        model = models.load_policy(path, torch.device("cpu"), mesh, True, dtype=dtype)
        models.attention_for = original
        times = []
        for _ in range(1 + a.rounds):
            start = time.perf_counter()
            for mb in split_micro_batches(lengths, 1, budget):
                out = forward_log_probs(model, [tokens[i] for i in mb], [responses[i] for i in mb], 1.0)
                (out["log_probs"].sum() / sum(responses)).backward()
            times.append(time.perf_counter() - start)
        best = min(times[1:])
        results[name] = {"seconds": best, "tokens_per_s": sum(lengths) / best}
        print(f"{name:28s} {sum(lengths) / best:7.0f} tok/s  ({best:.1f} s)", flush=True)
        del model
    base = results["sdpa masks, float32, 512"]["tokens_per_s"]
    for name in CONFIGS:
        results[name]["speedup_vs_sdpa_float32_512"] = results[name]["tokens_per_s"] / base
    text = json.dumps(results, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
