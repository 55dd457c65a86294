"""The token budget of a packed micro-batch when --use-dynamic-batch-size has no --max-tokens-per-gpu: as many tokens
as the rank's free memory holds activations for, so a GPU is not run with micro-batches a tenth of what fits."""

from __future__ import annotations

import logging

import torch

from slime.trainer.models import local_shard

logger = logging.getLogger(__name__)
CPU_BUDGET = 2048  # packed attention makes longer rows no slower per token on CPU; this bounds their memory
SMALLEST, LARGEST = 1024, 131072
USABLE = 0.8  # of what is free once gradients and optimizer state are counted: allocator slack, fragmentation
# (the bound below is loose: measured peaks on an H200 were 0.52 (Qwen3-0.6B shape) and 0.66 (SmolLM2) of it)


def activation_bytes_per_token(config, dtype: torch.dtype) -> int:
    """An upper bound on what one token keeps for backward: per decoder layer the norms' float32 inputs, the
    projections' inputs and outputs, attention's q/k/v/output and the MLP's four intermediate-sized tensors; at the
    head, its logits and their gradient (every token counted as a response token)."""
    c = getattr(config, "text_config", None) or config
    hidden = c.hidden_size
    head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    width = max(hidden, c.num_attention_heads * head_dim)
    intermediate = getattr(c, "intermediate_size", 4 * hidden)
    size = torch.finfo(dtype).bits // 8
    per_layer = 4 * 4 * hidden + size * (14 * width + 5 * intermediate)
    return c.num_hidden_layers * per_layer + 2 * size * c.vocab_size + 8 * hidden


def token_budget(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> int:
    """Tokens per training micro-batch on this rank (see module doc); CPU_BUDGET on CPU."""
    param = next(model.parameters())
    if not param.is_cuda:
        return CPU_BUDGET
    free, _ = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # our own cache is free for us too
    numel = sum(local_shard(p).numel() for p in model.parameters() if p.requires_grad)
    pending = 4 * numel + (0 if optimizer.state else 8 * numel)  # float32 gradients; AdamW's moments, once
    per_token = activation_bytes_per_token(model.config, dtype)
    budget = int(USABLE * max(0, free - pending) // per_token) // 1024 * 1024
    budget = min(LARGEST, max(SMALLEST, budget))
    logger.info(
        "token budget %d per micro-batch: %.1f GB free, %.1f GB for gradients/optimizer, ~%.0f KB per token",
        budget,
        free / 1e9,
        pending / 1e9,
        per_token / 1e3,
    )
    return budget
