"""Probe: how fast can a transformers model train at this size, and what does packing cost? Forward + backward of a
random Qwen3-0.6B-shaped model (bf16, no FSDP) on 10 x 384 tokens, packed into one row (position_ids restart per
sequence) and as a [10, 384] batch, under each attention implementation. Prints ms per pass and TFLOP/s (6 x 0.6e9
FLOPs per token). Usage on the GPU machine: python benchmarks/gpu/attention_probe.py"""

from __future__ import annotations

import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

N, LENGTH = 10, 384


def time_pass(model: torch.nn.Module, inputs: dict, repeats: int = 5) -> float:
    """Milliseconds per forward + backward (the loss reads the last position's logits)."""

    def one() -> None:
        model(**inputs, use_cache=False, logits_to_keep=1).logits.float().sum().backward()

    for _ in range(2):
        one()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        one()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )
    ids = torch.randint(100, 40000, (N, LENGTH), device="cuda")
    packed = {"input_ids": ids.reshape(1, -1), "position_ids": torch.arange(LENGTH, device="cuda").repeat(N)[None]}
    flops = 6 * 0.6e9 * N * LENGTH
    for impl in ("sdpa", "flex_attention", "eager"):
        try:
            with torch.device("cuda"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=impl)
            for name, inputs in (("packed", packed), ("batch", {"input_ids": ids})):
                ms = time_pass(model, inputs)
                print(f"{impl:15s} {name:6s} {ms:7.1f} ms  {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
            del model
        except Exception as exc:  # noqa: BLE001 - an implementation this transformers version lacks
            print(f"{impl} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
