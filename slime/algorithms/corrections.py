"""Corrections for the mismatch between the rollout engine and the trainer: both run the same weights, but their
numerics differ, so the engine samples from pi_rollout while the loss assumes pi_old (the trainer's log-probs).

- TIS (`--use-tis`): weight each token's policy loss by the importance ratio pi_old / pi_rollout, clipped to
  [--tis-clip-low, --tis-clip].
- MIS (`--use-mis`): mask out tokens (or whole samples) whose ratio falls outside [--mis-lower-bound,
  --mis-upper-bound] (IcePop-style at token level), and optionally veto a whole sample with any token ratio below
  --mis-veto-threshold.

The ratio is taken per token, per sequence (product of the token ratios) or as the geometric mean over the
sequence (`--tis-level`, `--mis-level`). `--custom-tis-function-path` replaces `importance_weights` with a
function of the same signature.
"""

from __future__ import annotations

import math
from typing import Any

import torch

Tokens = list[torch.Tensor]
LOG_RATIO_BOUND = 20.0  # exp(20) ~ 5e8: large enough for any meaningful ratio, small enough not to overflow


def level_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """The log importance ratio of each token at `level`, for one sample. log_ratio, mask: [r] -> [r].

    token: log_ratio itself. sequence: the masked sum over the sample (log of the product of the ratios), on every
    token. geometric: the masked mean (log of the geometric mean), on every token.
    """
    if level == "token":
        return log_ratio
    total = (log_ratio * mask).sum()
    if level == "sequence":
        return total.expand_as(log_ratio)
    if level == "geometric":
        return (total / mask.sum().clamp(min=1)).expand_as(log_ratio)
    raise ValueError(f"importance-ratio level must be token, sequence or geometric, not {level!r}")


def mismatch_metrics(train_log_probs: Tokens, rollout_log_probs: Tokens) -> dict[str, Tokens]:
    """Per-token measures of how far the engine's log-probs are from the trainer's, B tensors [r_i] each, averaged
    by the trainer like the loss: the k3 estimate exp(d) - 1 - d of the KL and |d|, with d = log pi_old - log
    pi_rollout."""
    raw = [t - r for t, r in zip(train_log_probs, rollout_log_probs, strict=True)]
    return {"mismatch_k3_kl": [torch.exp(d) - 1 - d for d in raw], "mismatch_logprob_abs_diff": [d.abs() for d in raw]}


def importance_weights(
    args: Any, *, train_log_probs: Tokens, rollout_log_probs: Tokens, loss_masks: Tokens
) -> tuple[Tokens, Tokens, dict[str, Tokens]]:
    """Per-sample token weights and masks for the policy loss, and per-token metrics.

    All inputs and outputs are B tensors [r_i]. weights multiply the per-token policy loss (all ones without TIS);
    masks multiply it too (0 where MIS rejects a token). Metrics map a name to B tensors [r_i] that the trainer
    averages like the loss (a per-sample value is repeated over the sample's tokens).
    """
    metrics = mismatch_metrics(train_log_probs, rollout_log_probs) | {
        "tis_clipped_fraction": [],
        "mis_rejected_fraction": [],
    }
    weights, masks = [], []
    for train, rollout, mask in zip(train_log_probs, rollout_log_probs, loss_masks, strict=True):
        raw = train - rollout
        weight, keep = torch.ones_like(raw), mask.clone()
        if args.use_tis:
            ratio = level_log_ratio(raw, mask, args.tis_level).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
            weight = ratio.clamp(args.tis_clip_low, args.tis_clip)
            metrics["tis_clipped_fraction"].append(((ratio < args.tis_clip_low) | (ratio > args.tis_clip)).float())
        else:
            metrics["tis_clipped_fraction"].append(torch.zeros_like(raw))
        if args.use_mis:
            log_ratio = level_log_ratio(raw, mask, args.mis_level)
            inside = (log_ratio >= math.log(args.mis_lower_bound)) & (log_ratio <= math.log(args.mis_upper_bound))
            keep = keep * inside
            if args.mis_veto_threshold is not None and bool(
                ((raw < math.log(args.mis_veto_threshold)) & (mask > 0)).any()
            ):
                keep = torch.zeros_like(keep)
        metrics["mis_rejected_fraction"].append((mask - keep).clamp(min=0))
        weights.append(weight.detach())
        masks.append(keep.detach())
    return weights, masks, metrics
