"""The RL loss of one micro-batch, assembled from the registered algorithm pieces."""

from __future__ import annotations

from typing import Any

import torch

from slime.algorithms.losses import KL_ESTIMATORS, POLICY_LOSSES, aggregate

STATS = ("loss", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "kl_loss", "logprob_abs_diff_vs_rollout")


def rl_loss(
    log_probs: torch.Tensor, entropy: torch.Tensor, batch: dict[str, Any], args: Any, normalizer: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip policy loss - entropy_coef * entropy + kl_loss_coef * KL(policy || reference).

    log_probs, entropy: [R] over the micro-batch's response tokens. batch: mask, advantages, old_log_probs [R],
    ref_log_probs and rollout_log_probs [R] or None, lengths (response tokens per sample). Each term is this
    micro-batch's share of the global-batch mean (see `aggregate`), so shares add up over micro-batches and
    ranks. Returns the loss (with graph) and the STATS as a float64 tensor of detached shares.
    """
    mask, lengths = batch["mask"], batch["lengths"]

    def agg(x: torch.Tensor) -> torch.Tensor:
        return aggregate(x, mask, lengths, args.calculate_per_token_loss, normalizer)

    terms = POLICY_LOSSES["ppo"](
        log_probs, batch["old_log_probs"], batch["advantages"], args.eps_clip, args.eps_clip_high, args.eps_clip_c
    )
    pg_loss, ent = agg(terms["loss"]), agg(entropy)
    loss = pg_loss - args.entropy_coef * ent
    kl = torch.zeros((), device=log_probs.device)
    if batch.get("ref_log_probs") is not None:
        kl = agg(KL_ESTIMATORS[args.kl_loss_type](log_probs, batch["ref_log_probs"]))
        loss = loss + args.kl_loss_coef * kl
    with torch.no_grad():
        rollout = batch.get("rollout_log_probs")
        diff = agg((batch["old_log_probs"] - rollout).abs()) if rollout is not None else torch.zeros(())
        values = [loss, pg_loss, agg(terms["clipfrac"]), agg(terms["ppo_kl"]), ent, kl, diff]
        stats = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return loss, stats
