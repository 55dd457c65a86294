"""Evaluation flags; eval datasets are read once here, from the flags and the YAML, into `args.eval_datasets`."""

from __future__ import annotations

import argparse
from typing import Any

from slime.config.rollout import check_sampling


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-prompt-data", nargs="*", default=None, help="NAME PATH [NAME PATH …] held-out datasets")
    g.add_argument(
        "--eval-config",
        default=None,
        help="YAML of eval datasets with per-dataset rm_type, keys and sampling (slime.utils.eval_config)",
    )
    g.add_argument(
        "--eval-function-path",
        default=None,
        help="rollout function used for evaluation (default: --rollout-function-path), called with evaluation=True",
    )
    g.add_argument(
        "--n-samples-per-eval-prompt", type=int, default=1, help="responses per eval prompt (pass@k up to it)"
    )
    g.add_argument("--eval-temperature", type=float, default=None, help="eval temperature (default: rollout's)")
    g.add_argument("--eval-top-p", type=float, default=None, help="eval nucleus mass (default: rollout's)")
    g.add_argument("--eval-top-k", type=int, default=None, help="eval top-k (default: rollout's)")
    g.add_argument("--eval-max-response-len", type=int, default=None, help="eval max new tokens (default: rollout's)")
    g.add_argument("--eval-max-prompts", type=int, default=None, help="evaluate the first N prompts of each dataset")
    g.add_argument(
        "--eval-interval",
        type=int,
        default=None,
        help="evaluate every this many rollout steps, and after the last one",
    )
    g.add_argument("--eval-input-key", default=None, help="prompt key of eval rows (default --input-key)")
    g.add_argument("--eval-label-key", default=None, help="label key of eval rows (default --label-key)")
    g.add_argument("--eval-tool-key", default=None, help="tool key of eval rows (default --tool-key)")
    g.add_argument("--eval-max-prompt-len", type=int, default=None, help="drop eval prompts longer than this (tokens)")
    g.add_argument("--eval-min-new-tokens", type=int, default=None, help="eval responses are at least this long")
    g.add_argument(
        "--eval-max-context-len",
        type=int,
        default=None,
        help="prompt + response budget of eval samples for generate functions (default --rollout-max-context-len)",
    )
    g.add_argument("--skip-eval-before-train", action="store_true", help="no evaluation at step 0")


def settle_eval(args: Any, parser: argparse.ArgumentParser) -> None:
    """Every eval dataset's settings, so a bad entry fails before anything starts."""
    from slime.utils.eval_config import EvalConfigError, eval_dataset_configs

    if args.eval_max_context_len is None:
        args.eval_max_context_len = args.rollout_max_context_len
    if args.eval_prompt_data is not None and (len(args.eval_prompt_data) == 0 or len(args.eval_prompt_data) % 2):
        parser.error("--eval-prompt-data takes pairs: NAME PATH [NAME PATH …]")
    try:
        configs = eval_dataset_configs(args)
    except EvalConfigError as exc:
        parser.error(str(exc))
    if args.eval_interval is not None and (args.eval_interval < 1 or not configs):
        parser.error("--eval-interval needs a positive value and eval datasets (--eval-prompt-data or --eval-config)")
    for c in configs:
        where = f"eval dataset {c.name!r}"
        if c.n_samples_per_eval_prompt < 1 or (c.max_prompts is not None and c.max_prompts < 1):
            parser.error(f"{where}: n_samples_per_eval_prompt and max_prompts must be at least 1")
        check_sampling(parser, where, c.temperature, c.top_p, c.top_k, c.max_response_len)
        if c.rm_type and c.rm_type != "remote_rm":  # a typo would score every sample 0 and the run would "pass"
            from slime.rollout.rm_hub import builtin_rm

            try:
                builtin_rm(c.rm_type)
            except ValueError as exc:
                parser.error(f"{where}: {exc}")
        if c.rm_type == "remote_rm" and not args.rm_url:
            parser.error(f"{where}: rm_type remote_rm needs --rm-url")
        for field in ("custom_rm_path", "custom_generate_function_path"):
            if getattr(c, field):
                from slime.utils.misc import load_function

                try:
                    load_function(getattr(c, field), f"{where} {field}")
                except (ImportError, ValueError, TypeError) as exc:
                    parser.error(str(exc))
    args.eval_datasets = configs
