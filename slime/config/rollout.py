"""Rollout flags: sampling, the rollout and generate hooks, dynamic sampling and partial rollout."""

from __future__ import annotations

import argparse
from typing import Any

from slime.config.checks import flag, require_at_least_one
from slime.config.data import DEFAULT_ROLLOUT_FUNCTION

HOOK_FLAGS = (
    "rollout_function_path",
    "custom_generate_function_path",
    "data_source_path",
    "dynamic_sampling_filter_path",
    "buffer_filter_path",
    "custom_rm_path",
    "custom_reward_post_process_path",
    "eval_function_path",
    "custom_loss_function_path",
    "custom_pg_loss_reducer_function_path",
    "custom_tis_function_path",
    "rollout_sample_filter_path",
    "rollout_all_samples_process_path",
    "rollout_data_postprocess_path",
    "custom_convert_samples_to_train_data_path",
    "custom_rollout_log_function_path",
    "custom_eval_rollout_log_function_path",
    "custom_advantage_function_path",
)


def add_rollout_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rollout")
    g.add_argument(
        "--num-rollout", type=int, default=None, help="rollout steps to run (default 1, or from --num-epoch)"
    )
    g.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per rollout step")
    g.add_argument("--n-samples-per-prompt", type=int, default=1, help="responses sampled per prompt (a group)")
    g.add_argument("--rollout-max-response-len", type=int, default=1024, help="max new tokens per response")
    g.add_argument("--rollout-temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--rollout-top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--rollout-top-k", type=int, default=-1, help="top-k sampling (-1: off)")
    g.add_argument("--rollout-stop", nargs="*", default=None, help="stop strings")
    g.add_argument("--rollout-stop-token-ids", type=int, nargs="*", default=None, help="extra stop token ids")
    g.add_argument("--rollout-skip-special-tokens", action="store_true", help="drop special tokens from text")
    g.add_argument(
        "--rollout-function-path",
        default=DEFAULT_ROLLOUT_FUNCTION,
        help="rollout function: (args, rollout_id, data_source, evaluation=False) -> samples",
    )
    g.add_argument(
        "--custom-generate-function-path",
        default=None,
        help="async generate(args, sample, sampling_params[, evaluation]) -> Sample, replacing the one-call default "
        "(multi-turn, tools: slime.rollout.multi_turn)",
    )
    g.add_argument(
        "--allow-weak-sandbox",
        action="store_true",
        help="let slime.rollout.sandbox run model-written code where the kernel cannot give it every layer "
        "(namespaces, read-only root, unprivileged user, seccomp); without it such code is refused, naming the "
        "missing layer",
    )
    g.add_argument(
        "--custom-config-path",
        default=None,
        help="YAML mapping read at start: each key becomes an attribute of args for custom functions to read (a key "
        "that names a flag overrides it)",
    )
    g.add_argument(
        "--data-source-path",
        default="slime.rollout.data_source.RolloutDataSourceWithBuffer",
        help="class built as cls(args) with get_samples(num_prompts), add_samples(groups) and __len__",
    )
    g.add_argument(
        "--over-sampling-batch-size",
        type=int,
        default=None,
        help="prompts submitted at a time while the step has too few groups (default --rollout-batch-size); "
        "more than --rollout-batch-size lets --dynamic-sampling-filter-path drop groups without waiting",
    )
    g.add_argument(
        "--dynamic-sampling-filter-path",
        default=None,
        help="fn(args, group, **kw) -> DynamicFilterOutput | bool judging each graded group; dropped groups are "
        "replaced by new prompts (e.g. slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std)",
    )
    g.add_argument(
        "--dynamic-sampling-max-prompts",
        type=int,
        default=None,
        help="prompts one rollout step may sample before it stops with the drop reasons (default 10 x "
        "--rollout-batch-size)",
    )
    g.add_argument(
        "--partial-rollout",
        action="store_true",
        help="groups aborted when the step is full keep their partial responses in the buffer and resume in the "
        "next rollout with the remaining token budget (without it they return as fresh prompts)",
    )
    g.add_argument(
        "--mask-offpolicy-in-partial-rollout",
        action="store_true",
        help="--partial-rollout: leave the tokens a resumed sample brought from an earlier rollout out of the loss",
    )
    g.add_argument(
        "--rollout-sample-filter-path",
        default=None,
        help="fn(args, groups) -> None, called on the step's kept groups: set Sample.remove_sample to leave a sample "
        "out of the loss (it still counts in its group's reward normalisation)",
    )
    g.add_argument(
        "--rollout-all-samples-process-path",
        default=None,
        help="fn(args, all_groups, data_source) -> None, called on every group the step generated, those dynamic "
        "sampling dropped and those aborted included (logging, curricula)",
    )
    g.add_argument(
        "--custom-convert-samples-to-train-data-path",
        default=None,
        help="fn(args, samples) -> dict with tokens, response_lengths, rewards, loss_masks (and optionally "
        "rollout_log_probs, teacher_log_probs, rollout_ids): replaces the conversion of the flat sample list",
    )
    g.add_argument(
        "--custom-rollout-log-function-path",
        default=None,
        help="fn(rollout_id, args, samples, metrics, seconds) -> bool, called on each training rollout; True drops "
        "the standard rollout/* metrics (the function logs its own)",
    )
    g.add_argument(
        "--custom-eval-rollout-log-function-path",
        default=None,
        help="fn(rollout_id, args, data, metrics) -> bool, called on each evaluation; True drops the standard "
        "eval/* metrics",
    )
    g.add_argument(
        "--buffer-filter-path",
        default=None,
        help="fn(args, rollout_id, buffer, num_samples) -> groups taken out of the buffer (default: pop_first)",
    )
    g.add_argument(
        "--rollout-max-context-len",
        type=int,
        default=None,
        help="prompt + response tokens a sample may hold: prompts longer than this - 1 are dropped (it sets "
        "--rollout-max-prompt-len's default); multi-turn generate functions read it as their budget",
    )
    g.add_argument(
        "--start-rollout-id",
        type=int,
        default=None,
        help="the first rollout id of a run that does not resume from --load (default 0)",
    )
    g.add_argument(
        "--update-weights-interval",
        type=int,
        default=1,
        help="push the trainer's weights to the engines every this many rollouts (and after the last)",
    )
    g.add_argument(
        "--async",
        dest="async_train",
        action="store_true",
        help="one-step overlap (what train_async.py runs): rollout k + 1 generates while rollout k trains, and the "
        "weights reach the engines between rollouts, so every sample is trained one step after the weights that "
        "generated it; not with --colocate or --offload-* (engines and trainer must run at the same time)",
    )
    g.add_argument(
        "--max-staleness",
        type=int,
        default=None,
        help="drop groups with a sample generated more than this many training steps before the step that trains "
        "it (counted in rollout/stale_dropped_groups; fully asynchronous rollouts draw replacements); default: no "
        "bound",
    )
    g.add_argument(
        "--keep-stale-samples",
        action="store_true",
        help="with --max-staleness: keep and count stale groups instead of dropping them; needs --use-tis or "
        "--use-mis to correct for the engine's older policy",
    )
    g.add_argument("--debug-rollout-only", action="store_true", help="run rollouts only (no training); report tok/s")
    g.add_argument(
        "--debug-train-only",
        action="store_true",
        help="train without engines or router: for rollout functions that generate nothing (slime.rollout.sft_rollout) "
        "or --load-debug-rollout-data; no weight sync, no evaluation",
    )
    g.add_argument(
        "--num-epoch",
        type=int,
        default=None,
        help="passes over --prompt-data: sets --num-rollout to num_epoch x prompts // --rollout-batch-size",
    )
    g.add_argument(
        "--save-debug-rollout-data",
        default=None,
        help="pickle each rollout's samples to this path, formatted with {rollout_id} "
        "(e.g. /tmp/rollout_{rollout_id}.pkl)",
    )
    g.add_argument(
        "--load-debug-rollout-data",
        default=None,
        help="train on the samples --save-debug-rollout-data wrote (path with {rollout_id}) instead of generating",
    )
    g.add_argument(
        "--load-debug-rollout-data-subsample",
        type=float,
        default=None,
        help="with --load-debug-rollout-data: keep this fraction (0-1] of the loaded groups",
    )
    g.add_argument("--rollout-timeout", type=float, default=3600.0, help="seconds one rollout step may take")
    g.add_argument(
        "--sglang-enable-deterministic-inference",
        action="store_true",
        help="reproducible rollouts: every request samples with its own seed (from --seed and the sample's index) "
        "and each engine runs one request at a time without a prefix cache, so results do not depend on batching or "
        "on which earlier request computed a shared prefix (slow; for resume checks and research)",
    )


def check_sampling(parser: argparse.ArgumentParser, where: str, temperature, top_p, top_k, max_new_tokens) -> None:
    """The router drops keys it does not know, so sampling values are checked here rather than trusted to a 400."""
    from slime.engine.sampling import SamplingParams, SamplingParamsError

    raw = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens}
    try:
        SamplingParams.from_dict(raw)
    except (SamplingParamsError, TypeError) as exc:
        parser.error(f"{where}: {exc}")


def validate_rollout(args: Any, parser: argparse.ArgumentParser) -> None:
    """Sizes, sampling, dynamic sampling and partial rollout settings, and every hook path imported once so a typo
    fails here."""
    from slime.utils.misc import load_function

    require_at_least_one(
        args,
        parser,
        "rollout_batch_size",
        "n_samples_per_prompt",
        "num_rollout",
        "over_sampling_batch_size",
        "dynamic_sampling_max_prompts",
        "num_epoch",
        "update_weights_interval",
    )
    if args.dynamic_sampling_max_prompts is not None and args.dynamic_sampling_max_prompts < args.rollout_batch_size:
        parser.error(
            f"--dynamic-sampling-max-prompts {args.dynamic_sampling_max_prompts} is below "
            f"--rollout-batch-size {args.rollout_batch_size}"
        )
    ctx = args.rollout_max_context_len
    if ctx is not None:
        if ctx < 2:
            parser.error(f"--rollout-max-context-len must be at least 2, got {ctx}")
        if args.rollout_max_prompt_len is None:  # as in slime: room for at least one generated token
            args.rollout_max_prompt_len = ctx - 1
        elif args.rollout_max_prompt_len > ctx - 1:
            parser.error(
                f"--rollout-max-prompt-len {args.rollout_max_prompt_len} leaves no room to generate within "
                f"--rollout-max-context-len {ctx}: it must be at most {ctx - 1}"
            )
    if args.debug_train_only and args.debug_rollout_only:
        parser.error("--debug-train-only and --debug-rollout-only exclude each other")
    sub = args.load_debug_rollout_data_subsample
    if sub is not None and not 0 < sub <= 1:
        parser.error(f"--load-debug-rollout-data-subsample must be in (0, 1], got {sub}")
    for dest in ("save_debug_rollout_data", "load_debug_rollout_data"):
        path = getattr(args, dest)
        if path and "{rollout_id}" not in path:
            parser.error(f"{flag(dest)} {path}: the path needs a {{rollout_id}} placeholder, one file per rollout")
    if args.start_rollout_id is not None and not 0 <= args.start_rollout_id < args.num_rollout:
        parser.error(f"--start-rollout-id {args.start_rollout_id} must be in [0, --num-rollout {args.num_rollout})")
    if args.update_weights_interval > 1 and args.offload_rollout:
        parser.error(
            "--update-weights-interval > 1 with --offload-rollout/--colocate: engines that release their weights "
            "for training get them back only through the weight sync; sync every rollout"
        )
    if args.async_train and (args.debug_rollout_only or args.debug_train_only):
        parser.error("--async overlaps generation with training: --debug-rollout-only/--debug-train-only run only one")
    if args.async_train and (args.offload_rollout or args.offload_train):
        parser.error(
            "--async overlaps generation with training, but --colocate/--offload-rollout/--offload-train make the "
            "engines and the trainer take turns on the GPU: drop them (on one GPU the engines and the trainer then "
            "share it as separate processes)"
        )
    lag = args.update_weights_interval - 1 + int(args.async_train)  # steps the engines' weights may trail by
    if args.max_staleness is not None and args.max_staleness < lag:
        parser.error(
            f"--max-staleness {args.max_staleness}: with --update-weights-interval {args.update_weights_interval}"
            + (" and --async" if args.async_train else "")
            + f" the engines generate on weights up to {lag} steps old, so every such sample would be dropped: "
            f"use at least {lag}"
        )
    if args.keep_stale_samples and (args.max_staleness is None or not (args.use_tis or args.use_mis)):
        parser.error("--keep-stale-samples needs --max-staleness and an off-policy correction (--use-tis or --use-mis)")
    if args.mask_offpolicy_in_partial_rollout and not args.partial_rollout:
        parser.error("--mask-offpolicy-in-partial-rollout needs --partial-rollout")
    check_sampling(
        parser,
        "rollout sampling flags",
        args.rollout_temperature,
        args.rollout_top_p,
        args.rollout_top_k,
        args.rollout_max_response_len,
    )
    for dest in HOOK_FLAGS:
        path = getattr(args, dest, None)
        if path:
            try:
                load_function(path, flag(dest))
            except (ImportError, ValueError, TypeError) as exc:
                parser.error(str(exc))
