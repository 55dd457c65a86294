"""The loss of one micro-batch, assembled from the registered algorithm pieces (`--loss-type`).

Every term is this micro-batch's share of a global-batch mean (see `aggregate`): shares add up over micro-batches
and ranks, so the loss and the reported metrics are exact whatever the packing and world size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from slime.algorithms.advantages import ADVANTAGE_ESTIMATORS
from slime.algorithms.losses import KL_ESTIMATORS, POLICY_RATIOS, aggregate, clipped_surrogate, value_loss

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MicroBatch:
    """One micro-batch on one rank: per-token tensors [R] (R = sum(lengths), the response tokens of its samples
    back to back), None where the run does not compute a column."""

    mask: torch.Tensor  # 1.0 where the token counts in the loss
    lengths: list[int]  # response tokens per sample
    normalizer: float = 1.0  # the global batch's sample count (or loss-token count, per-token loss)
    advantages: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None  # TIS weights
    is_masks: torch.Tensor | None = None  # MIS keep masks
    returns: torch.Tensor | None = None  # value targets (ppo)
    old_values: torch.Tensor | None = None  # the critic's values before the update (ppo)
    is_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token mismatch metrics
    pg_reducer: Callable | None = None  # --custom-pg-loss-reducer-function-path, built for this micro-batch
    custom_loss_fn: Callable | None = None  # --custom-loss-function-path
    tis_hook: Callable | None = None  # a --custom-tis-function-path with slime's signature (see `slime_tis`)
    total_lengths: list[int] = field(default_factory=list)  # prompt + response tokens per sample
    denominators: list[float] | None = None  # per sample: its trajectory's loss tokens (None: its own)

    def as_dict(self) -> dict[str, Any]:
        """The fields as the dict a --custom-loss-function-path hook receives (slime's batch is a dict)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def takes_pg_loss(fn: Callable) -> bool:
    """Whether a --custom-tis-function-path hook has slime's signature (it corrects the per-token policy loss of each
    micro-batch) rather than this project's (it returns importance weights and masks for the whole rollout)."""
    import inspect

    return "pg_loss" in inspect.signature(fn).parameters


def slime_tis(args: Any, batch: MicroBatch, pg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Call a slime-signature TIS/MIS hook: fn(args, pg_loss=[R], train_log_probs, rollout_log_probs, loss_masks
    (lists of per-sample tensors), total_lengths, response_lengths) -> (pg_loss [R], kept masks per sample,
    {name: [R] metric}). Returns the corrected loss, the kept mask [R] and the metrics."""
    if batch.rollout_log_probs is None:
        raise ValueError("--custom-tis-function-path needs the engine's log-prob of every response token")

    def split(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.split(batch.lengths))

    pg, masks, metrics = batch.tis_hook(
        args,
        pg_loss=pg,
        train_log_probs=split(batch.old_log_probs),
        rollout_log_probs=split(batch.rollout_log_probs),
        loss_masks=split(batch.mask),
        total_lengths=batch.total_lengths,
        response_lengths=batch.lengths,
    )
    return pg, torch.cat([m.to(pg.dtype) for m in masks]), dict(metrics or {})


def make_reduce(batch: MicroBatch, args: Any) -> Reduce:
    """[R] per-token values -> this micro-batch's share of their global mean over loss-masked tokens."""
    return lambda x: aggregate(
        x, batch.mask, batch.lengths, args.calculate_per_token_loss, batch.normalizer, batch.denominators
    )


def policy_loss(args: Any, batch: MicroBatch, out: dict[str, torch.Tensor], reduce: Reduce) -> tuple:
    """PPO-clip (or GSPO) policy loss, weighted and masked by the mismatch corrections, - entropy_coef · entropy
    + kl_loss_coef · KL(policy || reference). Tokens the MIS mask rejects leave every term, as in slime (their
    samples keep their full token count as the denominator). Returns the loss and its metrics."""
    log_probs = out["log_probs"]
    ratio = POLICY_RATIOS[ADVANTAGE_ESTIMATORS[args.advantage_estimator].policy_ratio]
    log_ratio = ratio(log_probs, batch.old_log_probs, batch.mask, batch.lengths)
    terms = clipped_surrogate(log_ratio, batch.advantages, args.eps_clip, args.eps_clip_high, args.eps_clip_c)
    pg = terms["loss"] * batch.is_weights if batch.is_weights is not None else terms["loss"]
    keep, unmasked, tis_metrics = batch.is_masks, reduce, {}
    if batch.tis_hook is not None:
        pg, keep, tis_metrics = slime_tis(args, batch, pg)
    if keep is not None:
        reduce = lambda x: unmasked(x * keep)  # noqa: E731 - the same reducer over the kept tokens
    if batch.pg_reducer is not None:  # a reducer returns the micro-batch sum; the normaliser makes it a share
        pg = pg * keep if keep is not None else pg
        pg_loss = batch.pg_reducer(pg) / batch.normalizer
    else:
        pg_loss = reduce(pg)
    entropy = reduce(out["entropy"])
    loss = pg_loss - args.entropy_coef * entropy
    metrics = {
        "pg_loss": pg_loss,
        "pg_clipfrac": reduce(terms["clipfrac"]),
        "ppo_kl": reduce(terms["ppo_kl"]),
        "entropy": entropy,
    }
    metrics |= {name: unmasked(value) for name, value in tis_metrics.items()}  # over every loss token, as slime
    if batch.ref_log_probs is not None:
        per_token = KL_ESTIMATORS[args.kl_loss_type](log_probs, batch.ref_log_probs)
        if getattr(args, "use_unbiased_kl", False):  # samples come from pi_old: importance-weight to pi
            per_token = torch.exp(log_probs - batch.old_log_probs) * per_token
        kl = reduce(per_token)
        metrics["kl_loss"] = kl
        if args.use_kl_loss:
            loss = loss + args.kl_loss_coef * kl
    return loss, metrics


def sft_loss(args: Any, batch: MicroBatch, out: dict[str, torch.Tensor], reduce: Reduce) -> tuple:
    """Negative log-likelihood of the loss-masked response tokens."""
    loss = reduce(-out["log_probs"])
    return loss, {"sft_loss": loss, "entropy": reduce(out["entropy"])}


def custom_loss(args: Any, batch: MicroBatch, out: dict[str, torch.Tensor], reduce: Reduce) -> tuple:
    """`--custom-loss-function-path`: fn(args, batch, logits, sum_of_sample_mean) -> (loss, metrics).

    batch is a dict of this micro-batch's [R] tensors (log_probs and entropy with gradient, old_log_probs,
    advantages, mask, ref/rollout log-probs or None) and lengths; logits are the [R, V] logits (before temperature)
    of the rows that predict response tokens. sum_of_sample_mean([R]) -> this micro-batch's share of the global mean;
    build the loss and each metric with it so they add up over micro-batches and ranks.
    """
    loss, metrics = batch.custom_loss_fn(args, batch.as_dict() | out, out["logits"], reduce)
    return loss, dict(metrics)


LOSSES: dict[str, Callable] = {"policy_loss": policy_loss, "sft_loss": sft_loss, "custom_loss": custom_loss}


def micro_batch_loss(
    args: Any, batch: MicroBatch, out: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch (with graph) and its detached metric shares, including the per-token mismatch
    metrics in batch.is_metrics and the trainer-vs-engine log-prob difference."""
    reduce = make_reduce(batch, args)
    loss, metrics = LOSSES[args.loss_type](args, batch, out, reduce)
    with torch.no_grad():
        shares = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        if batch.rollout_log_probs is not None:
            shares["logprob_abs_diff_vs_rollout"] = float(reduce((batch.old_log_probs - batch.rollout_log_probs).abs()))
        for name, values in batch.is_metrics.items():
            shares[name] = float(reduce(values))
    return loss, shares


def critic_loss(args: Any, batch: MicroBatch, values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The critic's clipped value loss (`--value-clip`) on one micro-batch, and its metric shares."""
    reduce = make_reduce(batch, args)
    terms = value_loss(values, batch.old_values, batch.returns, args.value_clip if args.value_clip > 0 else None)
    loss = reduce(terms["loss"])
    with torch.no_grad():
        shares = {
            "value_loss": float(loss),
            "value_clipfrac": float(reduce(terms["clipfrac"])),
            "values": float(reduce(values)),
        }
    return loss, shares
