"""Policy losses, KL estimators, entropy and loss aggregation: pure tensor functions, registered by name.

Token tensors are flat: [T] holds the response tokens of several samples back to back (packed, no padding), and
`lengths` says how many tokens each sample owns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

POLICY_LOSSES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}


def _register(table: dict[str, Callable], name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        table[name] = fn
        return fn

    return wrap


@_register(POLICY_LOSSES, "ppo")
def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate, per token: max(-r·A, -clip(r, 1-eps_clip, 1+eps_clip_high)·A), r = exp(lp - old).

    All inputs [T]. With `eps_clip_c` (dual clip, > 1), the loss of a token with negative advantage is further
    capped at -eps_clip_c·A. Returns [T] tensors: loss, clipfrac (1 where the clipped branch was taken), ppo_kl
    (old - new log-prob, the k1 estimate of KL(old || new)).
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    clipfrac = (clipped > unclipped).to(log_probs.dtype)
    if eps_clip_c is not None:
        capped = torch.minimum(loss, -eps_clip_c * advantages)
        loss = torch.where(advantages < 0, capped, loss)
    return {"loss": loss, "clipfrac": clipfrac, "ppo_kl": -log_ratio}


@_register(KL_ESTIMATORS, "k1")
def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log q, the unbiased (high-variance) sample estimate of KL(p || q). Shapes [T] -> [T]."""
    return log_probs - ref_log_probs


@_register(KL_ESTIMATORS, "k2")
def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k2 = (log p - log q)^2 / 2: biased, low variance; its gradient is that of the reverse KL. [T] -> [T]."""
    return (log_probs - ref_log_probs).square() / 2


@_register(KL_ESTIMATORS, "k3")
def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 = q/p - 1 - log(q/p) with samples from p: unbiased and non-negative. [T] -> [T]."""
    log_ratio = ref_log_probs - log_probs
    return torch.exp(log_ratio) - 1 - log_ratio


@_register(KL_ESTIMATORS, "low_var_kl")
def kl_low_var(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 with the log-ratio clamped to [-20, 20] and the result to [-10, 10], against overflow. [T] -> [T]."""
    log_ratio = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - 1 - log_ratio).clamp(-10.0, 10.0)


def entropy_from_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """Entropy of a distribution given as log-probabilities along the last dim: [..., V] -> [...]."""
    return -(log_p.exp() * log_p).sum(dim=-1)


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, lengths: list[int], per_token: bool, normalizer: float
) -> torch.Tensor:
    """Sum one micro-batch's share of a loss that is a mean over the whole global batch.

    values, mask: [T] (mask 1 for tokens that count); lengths: tokens per sample, summing to T.
    per_token=False (slime's default): each sample's masked token mean, summed; normalizer = samples in the global
    batch. per_token=True (`--calculate-per-token-loss`): the masked token sum; normalizer = masked tokens in the
    global batch. Summing the returned scalars over all micro-batches and ranks gives the exact global mean,
    however the batch was split.
    """
    masked = values * mask
    if per_token:
        return masked.sum() / normalizer
    sums = torch.stack([chunk.sum() for chunk in masked.split(lengths)]) if lengths else masked.new_zeros(0)
    counts = torch.stack([m.sum() for m in mask.split(lengths)]).to(values.dtype) if lengths else values.new_zeros(0)
    return (sums / counts.clamp(min=1.0)).sum() / normalizer
