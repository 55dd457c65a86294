"""Prompt data flags."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from slime.utils.mask_utils import LOSS_MASK_TYPES

DEFAULT_ROLLOUT_FUNCTION = "slime.rollout.sglang_rollout.generate_rollout"


def json_dict(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return parsed


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--prompt-data", help="JSONL or Parquet file, or builtin:arithmetic[:split][:n][:seed]")
    g.add_argument("--input-key", default="input", help="row key holding the prompt (string or chat messages)")
    g.add_argument("--label-key", default=None, help="row key holding the label passed to the reward")
    g.add_argument("--metadata-key", default="metadata", help="row key holding a dict copied to Sample.metadata")
    g.add_argument(
        "--tool-key",
        default=None,
        help="row key holding tool definitions given to the chat template (default: the metadata's 'tools', if any)",
    )
    g.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="format prompts with the tokenizer's template (without it, chat messages stay messages for a custom "
        "generate function or the SFT rollout)",
    )
    g.add_argument(
        "--loss-mask-type",
        default="qwen",
        choices=LOSS_MASK_TYPES,
        help="slime's SFT mask family; accepted for every model: the mask comes from the tokenizer's chat template "
        "(slime.utils.mask_utils)",
    )
    g.add_argument("--apply-chat-template-kwargs", type=json_dict, default={}, help="JSON kwargs for the template")
    g.add_argument("--rollout-shuffle", action="store_true", help="shuffle prompts, reshuffled each epoch")
    g.add_argument("--rollout-seed", type=int, default=42, help="seed of the prompt shuffle")
    g.add_argument("--rollout-max-prompt-len", type=int, default=None, help="drop prompts longer than this (tokens)")
    g.add_argument("--skip-invalid-data-rows", action="store_true", help="skip and count bad rows instead of failing")
    g.add_argument(
        "--rollout-global-dataset",
        action="store_true",
        default=True,
        help="the rollout manager serves --prompt-data to the rollout function (the default; kept for slime scripts)",
    )
    g.add_argument(
        "--disable-rollout-global-dataset",
        action="store_false",
        dest="rollout_global_dataset",
        help="no shared dataset: a custom --rollout-function-path brings its own prompts",
    )


def validate_data(args: Any, parser: argparse.ArgumentParser) -> None:
    if not args.rollout_global_dataset and args.rollout_function_path == DEFAULT_ROLLOUT_FUNCTION:
        parser.error("--disable-rollout-global-dataset needs a --rollout-function-path that brings its own prompts")
    if args.rollout_global_dataset and not args.prompt_data:
        parser.error("--prompt-data is required (or --disable-rollout-global-dataset with a custom rollout function)")


def settle_num_rollout(args: Any, parser: argparse.ArgumentParser) -> None:
    """--num-epoch -> --num-rollout, counting the prompts the data source will serve (after its filters)."""
    if args.num_epoch is not None and args.num_rollout is not None:
        logging.getLogger("slime.config").warning(
            "--num-rollout %d and --num-epoch %d both given: --num-rollout wins (as in slime)",
            args.num_rollout,
            args.num_epoch,
        )
        return
    if args.num_epoch is None or args.num_epoch < 1 or args.rollout_batch_size < 1:
        if args.num_rollout is None:
            args.num_rollout = 1
        return  # unset, or a value validate_rollout reports
    if not args.rollout_global_dataset:
        parser.error(
            "--num-epoch counts passes over --prompt-data; with --disable-rollout-global-dataset use --num-rollout"
        )
    from slime.data.dataset import DataError
    from slime.rollout.data_source import training_prompts

    try:
        prompts = len(training_prompts(args))
    except DataError as exc:
        parser.error(str(exc))
    args.num_rollout = args.num_epoch * prompts // args.rollout_batch_size
    if args.num_rollout < 1:
        parser.error(
            f"--num-epoch {args.num_epoch} over {prompts} prompts is less than one --rollout-batch-size "
            f"{args.rollout_batch_size}"
        )
