"""Algorithm flags: advantage estimator, policy loss, KL, train/inference mismatch corrections, distillation.

Names come from the registries in slime.algorithms, and what an estimator needs (a critic, a teacher, whitening)
from its registration, so a new estimator needs no change here.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from slime.config.checks import require_at_least_one


def add_algorithm_arguments(p: argparse.ArgumentParser) -> None:
    from slime.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from slime.algorithms.losses import KL_ESTIMATORS
    from slime.trainer.loss import LOSSES

    g = p.add_argument_group("algorithm")
    g.add_argument(
        "--advantage-estimator",
        default="grpo",
        choices=sorted(ADVANTAGE_ESTIMATORS),
        help="how rewards become per-token advantages (docs/algorithms.md); ppo trains a critic",
    )
    g.add_argument(
        "--loss-type",
        default="policy_loss",
        choices=list(LOSSES),
        help="policy_loss: PPO-clip (GSPO's sequence ratio for --advantage-estimator gspo); sft_loss: NLL of "
        "loss-masked tokens; custom_loss: --custom-loss-function-path",
    )
    g.add_argument("--custom-loss-function-path", default=None, help="fn(args, batch, logits, sum_of_sample_mean)")
    g.add_argument(
        "--custom-pg-loss-reducer-function-path",
        default=None,
        help="fn(total_lengths, response_lengths, loss_masks, calculate_per_token_loss) -> reducer of the policy "
        "loss; slime.algorithms.losses:dr_grpo_pg_loss_reducer is Dr. GRPO's constant normaliser",
    )
    g.add_argument(
        "--disable-compute-advantages-and-returns",
        action="store_false",
        dest="compute_advantages_and_returns",
        help="skip the behaviour-policy log-probs and the advantage estimator: for --loss-type sft_loss, or a "
        "custom loss that needs neither (its batch then has no advantages)",
    )
    g.add_argument(
        "--keep-old-actor",
        action="store_true",
        help="compute the old (behaviour) log-probs with a frozen copy of the weights the engines serve, refreshed at "
        "every weight sync, instead of the policy's weights at training time (they differ with "
        "--update-weights-interval > 1)",
    )
    g.add_argument(
        "--ref-update-interval",
        type=int,
        default=None,
        help="every this many rollouts, the KL reference takes the policy's weights (default: never)",
    )
    g.add_argument(
        "--num-critic-only-steps",
        type=int,
        default=0,
        help="the first this many rollouts train only the critic (ppo), the policy stays as loaded",
    )
    g.add_argument(
        "--get-mismatch-metrics",
        action="store_true",
        help="report how far the engine's log-probs are from the trainer's (train/mismatch_logprob_abs_diff and "
        "train/mismatch_k3_kl, averaged like the loss), recomputing the trainer's under --use-rollout-logprobs",
    )
    g.add_argument(
        "--use-rollout-entropy",
        action="store_true",
        help="compute the behaviour policy's per-token entropy with the old log-probs and hand it to "
        "--rollout-data-postprocess-path and --custom-advantage-function-path as rollout_data['entropy']",
    )
    g.add_argument(
        "--disable-grpo-std-normalization", action="store_true", help="GRPO: only subtract the group mean reward"
    )
    g.add_argument(
        "--disable-rewards-normalization",
        action="store_false",
        dest="rewards_normalization",
        help="grpo/gspo/reinforce_plus_plus_baseline: use the rewards as they are, without the group mean (and std) "
        "normalisation",
    )
    g.add_argument(
        "--normalize-advantages",
        action="store_true",
        help="whiten advantages over all loss-masked tokens of the rollout (implied by reinforce_plus_plus*)",
    )
    g.add_argument("--gamma", type=float, default=1.0, help="discount per token (reinforce_plus_plus*, ppo)")
    g.add_argument("--lambd", type=float, default=1.0, help="GAE lambda (ppo)")
    g.add_argument("--eps-clip", type=float, default=0.2, help="PPO clip range below (and above) ratio 1")
    g.add_argument("--eps-clip-high", type=float, default=None, help="PPO clip range above 1 (default: --eps-clip)")
    g.add_argument("--eps-clip-c", type=float, default=None, help="dual-clip bound (> 1) for negative advantages")
    g.add_argument("--entropy-coef", type=float, default=0.0, help="weight of the entropy bonus in the loss")
    g.add_argument("--use-kl-loss", action="store_true", help="add a KL penalty to the frozen reference model")
    g.add_argument("--kl-loss-coef", type=float, default=0.0, help="weight of the KL loss")
    g.add_argument(
        "--use-unbiased-kl",
        action="store_true",
        help="weight the per-token KL loss by pi / pi_old (with gradient), so the estimate is unbiased for samples "
        "from pi_old",
    )
    g.add_argument(
        "--kl-loss-type",
        default="k1",
        choices=list(KL_ESTIMATORS),
        help="KL estimator of the KL loss and of the --kl-coef reward penalty",
    )
    g.add_argument(
        "--kl-coef",
        type=float,
        default=0.0,
        help="KL to the reference as a reward penalty: per token for reinforce_plus_plus* and ppo, summed over "
        "the response for grpo/gspo (exclusive with --use-kl-loss)",
    )
    g.add_argument(
        "--calculate-per-token-loss",
        action="store_true",
        help="average the loss over all tokens of the global batch (default: per-sample token mean, then sample mean)",
    )
    g.add_argument(
        "--use-rollout-logprobs",
        action="store_true",
        help="use the engine's log-probs as the PPO old policy instead of recomputing them before training",
    )
    g.add_argument("--critic-load", default=None, help="ppo: critic backbone (default: --hf-checkpoint)")
    g.add_argument("--critic-lr", type=float, default=None, help="ppo: peak learning rate of the critic (default --lr)")
    g.add_argument("--value-clip", type=float, default=0.2, help="ppo: clip of the value update per step (0: off)")

    g = p.add_argument_group("train/inference mismatch")
    g.add_argument("--use-tis", action="store_true", help="weight the policy loss by pi_old / pi_rollout, clipped")
    g.add_argument("--tis-clip", type=float, default=2.0, help="TIS: upper bound of the importance weight")
    g.add_argument("--tis-clip-low", type=float, default=0.0, help="TIS: lower bound of the importance weight")
    g.add_argument("--tis-level", default="token", choices=["token", "sequence", "geometric"], help="TIS ratio level")
    g.add_argument(
        "--use-mis",
        action="store_true",
        help="mask tokens (or samples) whose pi_old / pi_rollout lies outside [--mis-lower-bound, --mis-upper-bound]",
    )
    g.add_argument("--mis-level", default="token", choices=["token", "sequence", "geometric"], help="MIS ratio level")
    g.add_argument("--mis-lower-bound", type=float, default=0.5, help="MIS: smallest kept ratio")
    g.add_argument("--mis-upper-bound", type=float, default=2.0, help="MIS: largest kept ratio")
    g.add_argument(
        "--mis-veto-threshold",
        type=float,
        default=None,
        help="MIS: drop a whole sample with any token ratio below this",
    )
    g.add_argument("--custom-tis-function-path", default=None, help="replaces the TIS/MIS weights (corrections.py)")
    g.add_argument(
        "--custom-advantage-function-path",
        default=None,
        help="fn(args, rollout_data) -> None replacing the estimator: it sets rollout_data['advantages'] and "
        "['returns'] (lists of [r_i] tensors) from log_probs, ref_log_probs, values, kl, rewards, loss_masks, "
        "response_lengths, total_lengths",
    )
    g.add_argument(
        "--rollout-data-postprocess-path",
        default=None,
        help="fn(args, rollout_id, rollout_data) -> None, called on each rank once advantages are computed; it may "
        "change rollout_data's loss_masks, advantages and returns (every rank sees the whole rollout)",
    )

    g = p.add_argument_group("on-policy distillation")
    g.add_argument(
        "--use-opd", action="store_true", help="add -opd_kl_coef x (log p_old - log p_teacher) to advantages"
    )
    g.add_argument(
        "--opd-type",
        default=None,
        choices=["model", "megatron", "sglang"],
        help="model (slime: megatron): --opd-teacher-load runs in the trainer; sglang: the reward or generate "
        "function sets Sample.teacher_log_probs",
    )
    g.add_argument("--opd-kl-coef", type=float, default=1.0, help="weight of the distillation term")
    g.add_argument("--opd-teacher-load", default=None, help="teacher Hugging Face folder (same tokenizer)")


def settle_algorithm(args: Any, parser: argparse.ArgumentParser) -> None:
    """Known names, ranges, the combinations that cannot mean anything, and the defaults that follow from others."""
    from slime.algorithms.advantages import ADVANTAGE_ESTIMATORS

    log = logging.getLogger(__name__)
    estimator = ADVANTAGE_ESTIMATORS[args.advantage_estimator]
    if args.eps_clip_high is None:
        args.eps_clip_high = args.eps_clip
    if args.eps_clip_c is not None and args.eps_clip_c <= 1.0:
        parser.error(f"--eps-clip-c must be greater than 1 (dual clip), got {args.eps_clip_c}")
    if args.use_kl_loss and args.kl_coef:
        parser.error(
            "--use-kl-loss and --kl-coef both penalise the KL to the reference (as a loss term and as a reward "
            "penalty): choose one"
        )
    if args.use_kl_loss and args.kl_loss_coef == 0:
        log.warning("--use-kl-loss with --kl-loss-coef 0: the KL is reported, not optimised")
    if not 0 < args.gamma <= 1 or not 0 <= args.lambd <= 1:
        parser.error(f"--gamma must be in (0, 1] and --lambd in [0, 1], got {args.gamma} and {args.lambd}")
    if args.gamma != 1 and args.advantage_estimator == "reinforce_plus_plus_baseline":
        log.warning("--gamma %s: reinforce_plus_plus_baseline does not discount (as in slime)", args.gamma)
    if estimator.whiten and not args.normalize_advantages:
        args.normalize_advantages = True  # the estimator is defined with batch whitening; raw returns are unscaled
        log.info("--advantage-estimator %s implies --normalize-advantages", args.advantage_estimator)
    if args.critic_lr is None:
        args.critic_lr = args.lr
    require_at_least_one(args, parser, "ref_update_interval")
    if args.ref_update_interval is not None and not (args.use_kl_loss or args.kl_coef):
        parser.error("--ref-update-interval moves the KL reference: use it with --use-kl-loss or --kl-coef")
    if args.num_critic_only_steps < 0:
        parser.error(f"--num-critic-only-steps must be at least 0, got {args.num_critic_only_steps}")
    if args.num_critic_only_steps and not estimator.needs_critic:
        parser.error(
            f"--num-critic-only-steps trains a critic alone; --advantage-estimator {args.advantage_estimator} has none"
        )
    if not args.compute_advantages_and_returns and args.loss_type == "policy_loss":
        parser.error(
            "--disable-compute-advantages-and-returns leaves the policy loss without advantages: use it with "
            "--loss-type sft_loss or custom_loss"
        )
    if (args.loss_type == "custom_loss") != bool(args.custom_loss_function_path):
        parser.error("--loss-type custom_loss and --custom-loss-function-path go together")
    if (args.use_tis or args.use_mis or args.custom_tis_function_path) and args.use_rollout_logprobs:
        parser.error(
            "--use-tis/--use-mis/--custom-tis-function-path correct pi_old (the trainer's log-probs) towards "
            "pi_rollout; with --use-rollout-logprobs the two are the same: drop one"
        )
    if args.use_tis and not 0 <= args.tis_clip_low < args.tis_clip:
        parser.error(f"--tis-clip-low {args.tis_clip_low} must be >= 0 and below --tis-clip {args.tis_clip}")
    if args.use_mis and not 0 < args.mis_lower_bound < args.mis_upper_bound:
        parser.error(
            f"--mis-lower-bound {args.mis_lower_bound} must be > 0 and below --mis-upper-bound {args.mis_upper_bound}"
        )
    distill = args.use_opd or estimator.needs_teacher
    if args.opd_type is None and args.opd_teacher_load:
        args.opd_type = "model"
    if distill and args.opd_type is None:
        parser.error(
            f"{'--use-opd' if args.use_opd else f'--advantage-estimator {args.advantage_estimator}'} needs a "
            "teacher: --opd-teacher-load PATH (run in the trainer) or --opd-type sglang (Sample.teacher_log_probs)"
        )
    if args.opd_type in ("model", "megatron") and not args.opd_teacher_load:
        parser.error(f"--opd-type {args.opd_type} needs --opd-teacher-load")
    if args.opd_type == "sglang" and args.opd_teacher_load:
        parser.error("--opd-type sglang takes teacher log-probs from the samples: drop --opd-teacher-load")
    if args.opd_teacher_load and not distill:
        parser.error("--opd-teacher-load without --use-opd or --advantage-estimator on_policy_distillation")
