"""Policy losses, KL estimators, entropy and loss aggregation: pure tensor functions, registered by name.

The policy loss is `clipped_surrogate` of an importance log-ratio; POLICY_RATIOS holds the ratio of each loss
(PPO's per token, GSPO's per sequence).

Token tensors are flat: [T] holds the response tokens of several samples back to back (packed, no padding), and
`lengths` says how many tokens each sample owns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

POLICY_RATIOS: dict[str, Callable] = {}
LOG_RATIO_BOUND = 20.0  # |log pi - log pi_old| is clamped to this before exp in the surrogate
KL_ESTIMATORS: dict[str, Callable] = {}


def _register(table: dict[str, Callable], name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        table[name] = fn
        return fn

    return wrap


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, eps_clip: float, eps_clip_high: float, eps_clip_c: float | None
) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate, per token: max(-r·A, -clip(r, 1-eps_clip, 1+eps_clip_high)·A), r = exp(log_ratio).

    log_ratio = log pi - log pi_old, advantages: [T]. With `eps_clip_c` (dual clip, > 1) the loss of a token with
    negative advantage is further capped at -eps_clip_c·A. The log-ratio is clamped to ±LOG_RATIO_BOUND before exp
    (the ratio stays finite in fp32). Returns [T] tensors: loss, clipfrac (1 where the
    clipped branch was taken), ppo_kl (-log_ratio, the k1 estimate of KL(old || new)).
    """
    # exp overflows fp32 above 88 (inf, then a NaN gradient); ratios beyond e^20 are clipped or capped anyway
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    clipfrac = (clipped > unclipped).to(log_ratio.dtype)
    if eps_clip_c is not None:
        capped = torch.minimum(loss, -eps_clip_c * advantages)
        loss = torch.where(advantages < 0, capped, loss)
    return {"loss": loss, "clipfrac": clipfrac, "ppo_kl": -log_ratio}


def sample_means(values: torch.Tensor, mask: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each sample's mean over its counted tokens (0 for a sample with none): [T], [T], B lengths -> [B]."""
    if not lengths:
        return values.new_zeros(0)
    sums = torch.stack([chunk.sum() for chunk in (values * mask).split(lengths)])
    counts = torch.stack([m.sum() for m in mask.split(lengths)]).to(values.dtype)
    return sums / counts.clamp(min=1.0)


@_register(POLICY_RATIOS, "ppo")
def token_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    """PPO's per-token log ratio log pi(y_t) - log pi_old(y_t). All tensors [T] -> [T]; mask and lengths unused
    (the common signature of POLICY_RATIOS)."""
    return log_probs - old_log_probs


@_register(POLICY_RATIOS, "gspo")
def sequence_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    """GSPO: one importance ratio per sequence, the geometric mean of its token ratios over counted tokens,
    s_i = exp(mean_t (log pi - log pi_old)), clipped like PPO (typical ranges are ~1e-3, not 0.2).

    All tensors [T] -> [T], samples back to back with `lengths`: every token carries log s_i, with its full gradient
    (mean_t grad log pi(y_t)). Unweighted, a sample's token mean of the per-token loss is its sequence loss; with
    per-token TIS weights w_t or MIS masks, the sequence gradient is scaled by the sample's mean weight (kept share),
    as in slime (the mean that forms s_i still runs over every counted token).
    """
    if not lengths:
        return log_probs - old_log_probs
    per_sequence = sample_means(log_probs - old_log_probs, mask, lengths)
    return per_sequence.repeat_interleave(torch.tensor(lengths, device=log_probs.device))


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, value_clip: float | None
) -> dict[str, torch.Tensor]:
    """The critic's clipped regression loss per token: 0.5 · max((V - G)^2, (V_old + clip(V - V_old, ±c) - G)^2).

    values (with grad), old_values (before this rollout's updates), returns (targets G): [T]. value_clip None: the
    plain 0.5 · (V - G)^2. Returns [T] tensors: loss, clipfrac (1 where the clipped term was larger).
    """
    unclipped = (values - returns).square()
    if value_clip is None:
        return {"loss": 0.5 * unclipped, "clipfrac": torch.zeros_like(values)}
    clipped = (old_values + (values - old_values).clamp(-value_clip, value_clip) - returns).square()
    return {"loss": 0.5 * torch.maximum(unclipped, clipped), "clipfrac": (clipped > unclipped).to(values.dtype)}


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


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    lengths: list[int],
    per_token: bool,
    normalizer: float,
    denominators: list[float] | None = None,
) -> torch.Tensor:
    """Sum one micro-batch's share of a loss that is a mean over the whole global batch.

    values, mask: [T] (mask 1 for tokens that count); lengths: tokens per sample, summing to T.
    per_token=False (slime's default): each sample's masked token mean, summed; normalizer = samples in the global
    batch. per_token=True (`--calculate-per-token-loss`): the masked token sum; normalizer = masked tokens in the
    global batch. Summing the returned scalars over all micro-batches and ranks gives the exact global mean,
    however the batch was split. `denominators` (per sample, per_token=False): divide each sample's masked token sum
    by this instead of its own count: the loss-token count of its trajectory when one trajectory was trained as
    several samples, so that the trajectory's token mean counts once (normalizer = trajectories in the batch).
    """
    if per_token:
        return (values * mask).sum() / normalizer
    if denominators is not None:
        sums = torch.stack([chunk.sum() for chunk in (values * mask).split(lengths)])
        return (sums / values.new_tensor(denominators).clamp(min=1.0)).sum() / normalizer
    return sample_means(values, mask, lengths).sum() / normalizer


def dr_grpo_pg_loss_reducer(
    total_lengths: list[int],
    response_lengths: list[int],
    loss_masks: list[torch.Tensor],
    calculate_per_token_loss: bool = False,
    args: Any = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Dr. GRPO's policy-loss normaliser, for `--custom-pg-loss-reducer-function-path
    slime.algorithms.losses:dr_grpo_pg_loss_reducer`: every sample's token sum is divided by one constant,
    `--rollout-max-response-len`, instead of its own length, so long responses are not down-weighted per token.

    A pg-loss reducer gets the micro-batch's lengths and masks ([r_i] tensors) and returns a function from the
    per-token loss [T] to the micro-batch's sum over samples; the trainer divides that by the samples of the global
    batch (tokens with `--calculate-per-token-loss`, where this reducer is the plain masked token sum).
    """
    constant = float(args.rollout_max_response_len if args is not None else max(response_lengths, default=1))

    def reduce(x: torch.Tensor) -> torch.Tensor:
        sums = [(xi * mi).sum() for xi, mi in zip(x.split(response_lengths), loss_masks, strict=True)]
        total = torch.stack(sums).sum() if sums else x.new_zeros(())
        return total if calculate_per_token_loss else total / constant

    return reduce
