"""Checkpoint and fault-tolerance flags."""

from __future__ import annotations

import argparse
from typing import Any

from slime.config.checks import flag


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints and faults")
    g.add_argument(
        "--save",
        default=None,
        help="folder of checkpoints (iter_XXXXXXX/ + latest_checkpointed_iteration.txt); saved every --save-interval "
        "rollouts and after the last one",
    )
    g.add_argument("--save-interval", type=int, default=None, help="rollouts between checkpoints (needs --save)")
    g.add_argument(
        "--load",
        default=None,
        help="resume from the newest complete checkpoint in this folder; a folder without one starts a fresh run "
        "(so the same command both starts and resumes when --load equals --save)",
    )
    g.add_argument(
        "--no-save-optim",
        action="store_true",
        help="leave optimizer state out of checkpoints (smaller; a resume then restarts AdamW's moments)",
    )
    g.add_argument("--no-load-optim", action="store_true", help="resume weights but start a fresh optimizer")
    g.add_argument("--no-load-rng", action="store_true", help="resume without restoring the saved RNG states")
    g.add_argument(
        "--save-hf-merged",
        action="store_true",
        help="with --lora-rank: --save-hf also writes the merged model (base + adapters) into <--save-hf>/merged; "
        "without it the folder holds the PEFT adapter alone",
    )
    g.add_argument(
        "--save-hf",
        default=None,
        help="also export the policy as a Hugging Face folder at each checkpoint; the path may contain {rollout_id}",
    )
    g.add_argument(
        "--max-nan-steps",
        type=int,
        default=3,
        help="optimizer steps with a non-finite loss or gradient norm are skipped; stop the run once more than this "
        "many were skipped",
    )
    g.add_argument(
        "--use-fault-tolerance",
        action="store_true",
        help="health-check engines during rollouts; restart a dead or hung one, give it the current weights, "
        "re-register it with the router, and retry its in-flight requests",
    )
    g.add_argument(
        "--rollout-health-check-interval",
        type=float,
        default=30.0,
        help="seconds between engine health checks (/health_generate) during a rollout",
    )
    g.add_argument(
        "--rollout-health-check-timeout",
        type=float,
        default=30.0,
        help="seconds an engine may take to answer a health check before it is restarted",
    )
    g.add_argument(
        "--rollout-health-check-first-wait",
        type=float,
        default=0.0,
        help="seconds after an engine (re)starts before its first health check",
    )


def validate_checkpoints(args: Any, parser: argparse.ArgumentParser) -> None:
    if args.save_interval is not None and (args.save_interval < 1 or not args.save):
        parser.error("--save-interval needs --save and must be at least 1")
    if args.save_hf:
        if not args.save:
            parser.error("--save-hf exports at checkpoints: set --save too")
        try:
            args.save_hf.format(rollout_id=0)
        except (KeyError, IndexError, ValueError) as exc:
            parser.error(f"--save-hf {args.save_hf!r}: the only placeholder allowed is {{rollout_id}} ({exc})")
    if args.max_nan_steps < 0:
        parser.error("--max-nan-steps must be >= 0")
    for dest in ("rollout_health_check_interval", "rollout_health_check_timeout"):
        if getattr(args, dest) <= 0:
            parser.error(f"{flag(dest)} must be > 0 seconds")
