"""Advantage estimators, registered by name (`--advantage-estimator`).

Every estimator maps one rollout to per-token advantages (and, for a critic, returns). Samples arrive in rollout
order: the samples of one prompt are consecutive (a group: `n_samples_per_prompt` of them, or the sizes in
`data.group_sizes` when a generate function returned several samples per trajectory). All per-token inputs are lists
of B tensors, one per sample, of shape [r_i] (r_i = that sample's response length), in a `TokenColumns`
(slime.utils.types); rewards are [B] outcome rewards.

An estimator returns (advantages, returns); returns is None unless a critic needs value targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from slime.utils.types import TokenColumns

Tokens = list[torch.Tensor]


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator and what it needs from the trainer, so the trainer asks the registration instead of
    checking names."""

    fn: Callable[[torch.Tensor, TokenColumns, Any], tuple[Tokens, Tokens | None]]
    needs_critic: bool = False  # the trainer loads and trains a value model; `values` is filled
    needs_teacher: bool = False  # teacher log-probs are required (--opd-teacher-load or --opd-type sglang)
    whiten: bool = False  # defined with batch whitening: implies --normalize-advantages
    policy_ratio: str = "ppo"  # the importance ratio of its policy loss (slime.algorithms.losses.POLICY_RATIOS)

    def __call__(self, rewards: torch.Tensor, data: TokenColumns, args: Any) -> tuple[Tokens, Tokens | None]:
        return self.fn(rewards, data, args)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, **needs: Any) -> Callable:
    """Register `fn` as `--advantage-estimator name`; `needs` are AdvantageEstimator's fields."""

    def wrap(fn: Callable) -> Callable:
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(fn, **needs)
        return fn

    return wrap


def group_normalize(
    rewards: torch.Tensor, group_size: int | list[int], std_normalization: bool, eps: float = 1e-6
) -> torch.Tensor:
    """Centre each group's rewards on the group mean and, optionally, divide by the group's std.

    rewards: [B], groups consecutive: of `group_size` each, or of the sizes listed (summing to B). Returns [B].
    The std is the unbiased sample std (n - 1 in the denominator); a group of one has std 0 and is only centred.
    A group whose rewards are all equal gets advantage 0 everywhere.
    """
    if isinstance(group_size, list):
        if sum(group_size) != rewards.numel():
            raise ValueError(f"group sizes {group_size} do not add up to {rewards.numel()} rewards")
        parts = rewards.split(group_size)
        return torch.cat([group_normalize(p, p.numel(), std_normalization, eps) for p in parts])
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if std_normalization and group_size > 1:
        centred = centred / (grouped.std(dim=-1, keepdim=True) + eps)
    return centred.reshape(-1)


def group_scores(
    rewards: torch.Tensor, args: Any, std_normalization: bool, group_sizes: list[int] | None = None
) -> torch.Tensor:
    """`group_normalize` over the prompt groups (`group_sizes`, else `--n-samples-per-prompt` each), unless
    `--custom-reward-post-process-path` or `--custom-convert-samples-to-train-data-path` already turned the rewards
    into scores (their returned `rewards`, as in slime, replace this step) or `--disable-rewards-normalization` asks
    for the rewards as they are. rewards: [B]."""
    hooked = getattr(args, "custom_reward_post_process_path", None) or getattr(
        args, "custom_convert_samples_to_train_data_path", None
    )
    if hooked or not getattr(args, "rewards_normalization", True):
        return rewards
    return group_normalize(rewards, group_sizes or args.n_samples_per_prompt, std_normalization)


def discounted_returns(token_rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s-t) * r_s. [r] -> [r]."""
    out = torch.empty_like(token_rewards)
    running = token_rewards.new_zeros(())
    for t in range(token_rewards.numel() - 1, -1, -1):
        running = token_rewards[t] + gamma * running
        out[t] = running
    return out


def gae(token_rewards: torch.Tensor, values: torch.Tensor, gamma: float, lambd: float) -> tuple[torch.Tensor, ...]:
    """Generalised advantage estimation over one response; the state after the last token is terminal (V = 0).

    token_rewards, values: [r]. delta_t = r_t + gamma * V_{t+1} - V_t, A_t = sum_k (gamma * lambd)^k delta_{t+k}.
    Returns advantages [r] and value targets (returns) A_t + V_t [r].
    """
    advantages = torch.empty_like(token_rewards)
    running = token_rewards.new_zeros(())
    for t in range(token_rewards.numel() - 1, -1, -1):
        next_value = values[t + 1] if t + 1 < values.numel() else 0.0
        delta = token_rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lambd * running
        advantages[t] = running
    return advantages, advantages + values


def masked_whiten(values: Tokens, masks: Tokens, eps: float = 1e-8) -> Tokens:
    """Whiten advantages over every masked-in token of the batch: (a - mean) / sqrt(var + eps), unbiased var.

    values, masks: B tensors [r_i]. Tokens with mask 0 are shifted and scaled like the others but do not count in
    the statistics. A batch with fewer than two counted tokens is only centred.
    """
    flat, mask = torch.cat(values).double(), torch.cat(masks).double()
    count = mask.sum()
    if count == 0:
        return values
    mean = (flat * mask).sum() / count
    if count < 2:
        return [(v - mean).to(v.dtype) for v in values]
    var = ((flat - mean).square() * mask).sum() / (count - 1)
    scale = torch.rsqrt(var + eps)
    return [((v - mean) * scale).to(v.dtype) for v in values]


def _last_counted(mask: torch.Tensor) -> int:
    """Index of the last token that counts (the model's final token); the last token if none counts."""
    counted = mask.nonzero()
    return int(counted[-1]) if counted.numel() else mask.numel() - 1


def token_rewards(reward: float, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards of one response: -kl_coef * kl_t on counted tokens, plus the outcome reward on the last
    counted token. kl, mask: [r] -> [r]."""
    out = -kl_coef * kl * mask
    if out.numel():
        out[_last_counted(mask)] += reward
    return out


@register_advantage("grpo")
@register_advantage("gspo", policy_ratio="gspo")
def grpo(rewards: torch.Tensor, data: TokenColumns, args: Any) -> tuple[Tokens, None]:
    """GRPO (and GSPO, which differs only in its loss): the group-normalised outcome reward on every token.

    With `--kl-coef` the sequence's KL estimate (sum over counted tokens) is subtracted from its reward first.
    `--disable-grpo-std-normalization` keeps only the mean-centring (Dr. GRPO's advantage).
    """
    if args.kl_coef:
        kl = [(k * m).sum() for k, m in zip(data.kl, data.loss_masks, strict=True)]
        rewards = rewards - args.kl_coef * torch.stack(kl).to(rewards.dtype)
    scores = group_scores(rewards, args, not args.disable_grpo_std_normalization, data.group_sizes)
    return [
        torch.full_like(m, float(s), dtype=rewards.dtype) for s, m in zip(scores, data.loss_masks, strict=True)
    ], None


@register_advantage("reinforce_plus_plus", whiten=True)
def reinforce_plus_plus(rewards: torch.Tensor, data: TokenColumns, args: Any) -> tuple[Tokens, None]:
    """REINFORCE++: discounted (`--gamma`) token returns of the KL-penalised token rewards (see `token_rewards`).
    Whitened over the whole batch afterwards (`--normalize-advantages` is implied)."""
    return [
        discounted_returns(token_rewards(float(r), k, m, args.kl_coef), args.gamma)
        for r, k, m in zip(rewards, data.kl, data.loss_masks, strict=True)
    ], None


@register_advantage("reinforce_plus_plus_baseline", whiten=True)
def reinforce_plus_plus_baseline(rewards: torch.Tensor, data: TokenColumns, args: Any) -> tuple[Tokens, None]:
    """REINFORCE++-baseline as slime defines it: the group-centred reward on every token minus that token's KL
    penalty, A_t = (r - mean of the group's r) - kl_coef * kl_t, without discounting (`--gamma` does not apply).
    Whitened over the whole batch afterwards (`--normalize-advantages` is implied)."""
    centred = group_scores(rewards, args, False, data.group_sizes)
    return [torch.full_like(k, float(c)) - args.kl_coef * k for c, k in zip(centred, data.kl, strict=True)], None


@register_advantage("ppo", needs_critic=True)
def ppo(rewards: torch.Tensor, data: TokenColumns, args: Any) -> tuple[Tokens, Tokens]:
    """PPO with a critic: GAE (`--gamma`, `--lambd`) over the KL-penalised token rewards and the critic's values.
    Returns advantages and the critic's targets."""
    out = [
        gae(token_rewards(float(r), k, m, args.kl_coef), v, args.gamma, args.lambd)
        for r, k, m, v in zip(rewards, data.kl, data.loss_masks, data.values, strict=True)
    ]
    return [a for a, _ in out], [g for _, g in out]


@register_advantage("on_policy_distillation", needs_teacher=True)
def on_policy_distillation(rewards: torch.Tensor, data: TokenColumns, args: Any) -> tuple[Tokens, None]:
    """On-policy distillation: A_t = opd_kl_coef * (log p_teacher(y_t) - log p_old(y_t)), the negative per-token
    reverse KL to the teacher on the student's own samples, weighted as `--use-opd` weights it. Rewards are not
    used."""
    coef = args.opd_kl_coef
    return [coef * (t - o) for t, o in zip(data.teacher_log_probs, data.old_log_probs, strict=True)], None


def compute_advantages(rewards: torch.Tensor, data: TokenColumns, args: Any) -> tuple[Tokens, Tokens | None]:
    """The configured estimator, then the on-policy-distillation penalty (`--use-opd`, added to any estimator
    but `on_policy_distillation` itself) and whitening (`--normalize-advantages`)."""
    estimator = ADVANTAGE_ESTIMATORS[args.advantage_estimator]
    advantages, returns = estimator(rewards, data, args)
    if args.use_opd and not estimator.needs_teacher:
        advantages = [
            a - args.opd_kl_coef * (o - t)
            for a, o, t in zip(advantages, data.old_log_probs, data.teacher_log_probs, strict=True)
        ]
    if args.normalize_advantages:
        advantages = masked_whiten(advantages, data.loss_masks)
    return advantages, returns
