"""The loss of one micro-batch, assembled from the registered algorithm pieces (`--loss-type`).

Every term is this micro-batch's share of a global-batch mean (see `aggregate`): shares add up over micro-batches
and ranks, so the loss and the reported metrics are exact whatever the packing and world size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from slime.algorithms.losses import KL_ESTIMATORS, POLICY_RATIOS, aggregate, clipped_surrogate, value_loss

Reduce = Callable[[torch.Tensor], torch.Tensor]


def make_reduce(batch: dict[str, Any], args: Any, normalizer: float) -> Reduce:
    """[R] per-token values -> this micro-batch's share of their global mean over loss-masked tokens."""
    return lambda x: aggregate(x, batch["mask"], batch["lengths"], args.calculate_per_token_loss, normalizer)


def policy_loss(args: Any, batch: dict[str, Any], out: dict[str, torch.Tensor], reduce: Reduce) -> tuple:
    """PPO-clip (or GSPO) policy loss, weighted and masked by the mismatch corrections, - entropy_coef · entropy
    + kl_loss_coef · KL(policy || reference). Returns the loss and its metrics."""
    log_probs = out["log_probs"]
    ratio = POLICY_RATIOS["gspo" if args.advantage_estimator == "gspo" else "ppo"]
    log_ratio = ratio(log_probs, batch["old_log_probs"], batch["mask"], batch["lengths"])
    terms = clipped_surrogate(log_ratio, batch["advantages"], args.eps_clip, args.eps_clip_high, args.eps_clip_c)
    keep = batch.get("is_masks")
    pg = terms["loss"] * batch["is_weights"] if batch.get("is_weights") is not None else terms["loss"]
    pg = pg * keep if keep is not None else pg
    if batch.get("pg_reducer") is not None:  # a reducer returns the micro-batch sum; the normaliser makes it a share
        pg_loss = batch["pg_reducer"](pg) / batch["normalizer"]
    else:
        pg_loss = reduce(pg)
    entropy = reduce(out["entropy"])
    loss = pg_loss - args.entropy_coef * entropy
    metrics = {"pg_loss": pg_loss, "pg_clipfrac": reduce(terms["clipfrac"]), "ppo_kl": reduce(terms["ppo_kl"]),
               "entropy": entropy}  # fmt: skip
    if batch.get("ref_log_probs") is not None:
        kl = reduce(KL_ESTIMATORS[args.kl_loss_type](log_probs, batch["ref_log_probs"]))
        metrics["kl_loss"] = kl
        if args.use_kl_loss:
            loss = loss + args.kl_loss_coef * kl
    return loss, metrics


def sft_loss(args: Any, batch: dict[str, Any], out: dict[str, torch.Tensor], reduce: Reduce) -> tuple:
    """Negative log-likelihood of the loss-masked response tokens."""
    loss = reduce(-out["log_probs"])
    return loss, {"sft_loss": loss, "entropy": reduce(out["entropy"])}


def custom_loss(args: Any, batch: dict[str, Any], out: dict[str, torch.Tensor], reduce: Reduce) -> tuple:
    """`--custom-loss-function-path`: fn(args, batch, logits, sum_of_sample_mean) -> (loss, metrics).

    batch holds this micro-batch's [R] tensors (log_probs and entropy with gradient, old_log_probs, advantages,
    mask, ref/rollout log-probs or None) and lengths; logits are the [R, V] logits (before temperature) of the rows
    that predict response tokens. sum_of_sample_mean([R]) -> this micro-batch's share of the global mean; build the
    loss and each metric with it so they add up over micro-batches and ranks.
    """
    loss, metrics = batch["custom_loss_fn"](args, {**batch, **out}, out["logits"], reduce)
    return loss, dict(metrics)


LOSSES: dict[str, Callable] = {"policy_loss": policy_loss, "sft_loss": sft_loss, "custom_loss": custom_loss}


def micro_batch_loss(
    args: Any, batch: dict[str, Any], out: dict[str, torch.Tensor], normalizer: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch (with graph) and its detached metric shares, including the per-token mismatch
    metrics in batch["is_metrics"] and the trainer-vs-engine log-prob difference."""
    reduce = make_reduce(batch, args, normalizer)
    loss, metrics = LOSSES[args.loss_type](args, {**batch, "normalizer": normalizer}, out, reduce)
    with torch.no_grad():
        shares = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        rollout = batch.get("rollout_log_probs")
        if rollout is not None:
            shares["logprob_abs_diff_vs_rollout"] = float(reduce((batch["old_log_probs"] - rollout).abs()))
        for name, values in (batch.get("is_metrics") or {}).items():
            shares[name] = float(reduce(values))
    return loss, shares


def critic_loss(
    args: Any, batch: dict[str, Any], values: torch.Tensor, normalizer: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The critic's clipped value loss (`--value-clip`) on one micro-batch, and its metric shares."""
    reduce = make_reduce(batch, args, normalizer)
    terms = value_loss(values, batch["old_values"], batch["returns"], args.value_clip if args.value_clip > 0 else None)
    loss = reduce(terms["loss"])
    with torch.no_grad():
        shares = {"value_loss": float(loss), "value_clipfrac": float(reduce(terms["clipfrac"])),
                  "values": float(reduce(values))}  # fmt: skip
    return loss, shares
