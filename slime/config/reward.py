"""Reward flags (slime.rollout.rm_hub)."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def add_reward_arguments(p: argparse.ArgumentParser) -> None:
    from slime.rollout.rm_hub import BOXED_READY, BUILTIN_RM

    g = p.add_argument_group("reward")
    g.add_argument(
        "--rm-type",
        default=None,
        help=f"built-in reward (docs/rewards.md): {', '.join(BUILTIN_RM)} or remote_rm; "
        f"{' / '.join('boxed_' + t for t in BOXED_READY)} grade only the last \\boxed{{}}",
    )
    g.add_argument(
        "--custom-rm-path",
        default=None,
        help="module:function, async (args, sample, **kw) -> float | dict; with --group-rm (args, samples, **kw) "
        "-> one reward per sample",
    )
    g.add_argument(
        "--custom-reward-post-process-path",
        default=None,
        help="fn(args, samples) -> (raw_rewards, rewards), one per sample; its rewards replace the group "
        "normalisation of grpo/gspo/reinforce_plus_plus_baseline",
    )
    g.add_argument("--reward-key", default=None, help="key of the scalar when rewards are dicts")
    g.add_argument("--eval-reward-key", default=None, help="key of the scalar in eval rewards (default --reward-key)")
    g.add_argument(
        "--group-rm",
        action="store_true",
        help="reward each group once it is fully generated; --custom-rm-path then gets the whole group in one call",
    )
    g.add_argument("--rm-url", default=None, help="remote_rm: URL that answers POST {prompt, response, label}")
    g.add_argument(
        "--rm-max-retries", type=int, default=3, help="remote_rm: retries after a connection error or 5xx answer"
    )
    g.add_argument(
        "--reward-on-error",
        type=float,
        default=0.0,
        help="reward of a sample whose reward function raised or timed out (the sample is marked and counted)",
    )
    g.add_argument(
        "--rm-timeout",
        type=float,
        default=60.0,
        help="seconds one reward call may take (one sample, or one group with --group-rm; retries included)",
    )


def validate_reward(args: Any, parser: argparse.ArgumentParser) -> None:
    """A reward type that would fail on every sample is refused before anything starts."""
    from slime.config.data import DEFAULT_ROLLOUT_FUNCTION

    # a custom rollout or generate function may set Sample.reward itself, and a supervised run needs none
    grades = args.rollout_function_path == DEFAULT_ROLLOUT_FUNCTION and not args.custom_generate_function_path
    needs = grades and args.compute_advantages_and_returns and not args.load_debug_rollout_data
    if needs and not args.rm_type and not args.custom_rm_path:
        parser.error("set --rm-type (e.g. math) or --custom-rm-path so samples get rewards")
    if (args.custom_rm_path or "").startswith("slime.rollout.on_policy_distillation") and not args.rm_url:
        parser.error(f"--custom-rm-path {args.custom_rm_path} asks a teacher server: give its --rm-url (…/generate)")
    if args.rm_type == "remote_rm" and not args.rm_url:
        parser.error("--rm-type remote_rm needs --rm-url")
    if args.rm_type and args.rm_type != "remote_rm":
        from slime.rollout.rm_hub import builtin_rm

        try:
            builtin_rm(args.rm_type)
        except ValueError as exc:
            parser.error(f"--rm-type: {exc}")
    if args.rm_timeout <= 0 or args.rm_max_retries < 0:
        parser.error(
            f"--rm-timeout must be positive and --rm-max-retries non-negative, got {args.rm_timeout} and "
            f"{args.rm_max_retries}"
        )
    if args.group_rm and not args.custom_rm_path:
        logging.getLogger(__name__).info("--group-rm without --custom-rm-path: built-in rewards grade per sample")
