"""AdamW and the learning-rate schedule (linear warm-up, then constant, linear or cosine decay to --min-lr)."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, lr: float, min_lr: float, warmup: int, decay_iters: int, style: str) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if style == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    if style == "linear":
        return lr + (min_lr - lr) * progress
    if style == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"--lr-decay-style must be constant, linear or cosine, not {style!r}")


def build_optimizer(
    model: torch.nn.Module, args, lr: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters with peak rate `lr` (--lr, or --critic-lr for the critic) and the
    schedule of the --lr-* flags, scaled to that peak."""
    params = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel: one pass over each tensor instead of a dozen (CPU: 0.13 s vs 0.45 s a step for SmolLM2)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
        fused=fused or None,
    )
    total = args.num_rollout * args.num_steps_per_rollout
    decay_iters = args.lr_decay_iters or total

    def factor(step: int) -> float:  # LambdaLR multiplies the optimizer's base lr by this
        rate = lr_at(step, args.lr, args.min_lr, args.lr_warmup_iters, decay_iters, args.lr_decay_style)
        return rate / args.lr if args.lr else 0.0

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, schedule
