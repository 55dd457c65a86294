"""Advantage estimators, registered by name (`--advantage-estimator`).

Each estimator maps one rollout's rewards to per-token advantages of every sample's response. Samples arrive in
rollout order: the `n_samples_per_prompt` responses of one prompt are consecutive (a group).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def register_advantage(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def group_normalize(rewards: torch.Tensor, group_size: int, std_normalization: bool, eps: float = 1e-6) -> torch.Tensor:
    """Centre each group's rewards on the group mean and, optionally, divide by the group's std.

    rewards: [B] with B = num_groups * group_size, groups consecutive. Returns [B].
    The std is the unbiased sample std (n - 1 in the denominator); a group of one has std 0 and is only centred.
    A group whose rewards are all equal gets advantage 0 everywhere.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if std_normalization and group_size > 1:
        centred = centred / (grouped.std(dim=-1, keepdim=True) + eps)
    return centred.reshape(-1)


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, response_lengths: list[int], group_size: int, args) -> list[torch.Tensor]:
    """GRPO: the group-normalised outcome reward, broadcast over every response token.

    rewards: [B]; response_lengths: B ints. Returns B tensors of shape [response_length_i].
    `--disable-grpo-std-normalization` keeps only the mean-centring (Dr. GRPO's advantage).
    """
    scores = group_normalize(rewards, group_size, not args.disable_grpo_std_normalization)
    return [torch.full((n,), float(s), dtype=rewards.dtype) for s, n in zip(scores, response_lengths, strict=True)]
