"""Where metrics go: the JSONL file and TensorBoard always, Weights & Biases on request (slime's flags)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from typing import Any


def add_observe_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument(
        "--use-tensorboard",
        action="store_true",
        help="accepted for slime scripts: TensorBoard events are always written (under --output-dir, or "
        "--tb-project-name)",
    )
    g.add_argument(
        "--tb-project-name",
        default=None,
        help="folder of the TensorBoard events (default <--output-dir>/tensorboard; slime also reads TENSORBOARD_DIR)",
    )
    g.add_argument("--tb-experiment-name", default=None, help="sub-folder of --tb-project-name for this run")
    g.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        help="start a new run in an --output-dir that holds an earlier run's metrics, deleting its metrics.jsonl, "
        "TensorBoard events and W&B run id first (without it such a folder is refused, unless --load resumes the run)",
    )
    g.add_argument(
        "--log-samples-count",
        type=int,
        default=4,
        help="sample responses (prompt, response, reward, label) recorded per training rollout and per eval dataset: "
        "in <--output-dir>/samples.jsonl, as a W&B table and in the run report (0: none)",
    )
    g.add_argument(
        "--log-samples-interval",
        type=int,
        default=1,
        help="record training rollouts' sample responses every this many rollouts (evaluations: every evaluation)",
    )
    g.add_argument(
        "--disable-report",
        action="store_false",
        dest="write_report",
        help="do not write <--output-dir>/report.html when the run ends (`slime report DIR` writes it any time)",
    )
    g.add_argument("--use-wandb", action="store_true", help="also log every metric to Weights & Biases")
    g.add_argument(
        "--wandb-mode",
        default=None,
        choices=["online", "offline", "disabled"],
        help="online (default; needs the W&B server), offline (files under --wandb-dir, `wandb sync` later) or "
        "disabled; overrides WANDB_MODE",
    )
    g.add_argument("--wandb-dir", default=None, help="folder of the W&B files (default <--output-dir>)")
    g.add_argument("--wandb-key", default=None, help="API key to log in with (online mode; else the stored login)")
    g.add_argument("--wandb-host", default=None, help="W&B server URL (self-hosted)")
    g.add_argument("--wandb-team", default=None, help="W&B entity (team or user) owning the run")
    g.add_argument("--wandb-project", default=None, help="W&B project (default 'slime')")
    g.add_argument("--wandb-group", default=None, help="W&B run group; also the run name's stem")
    g.add_argument(
        "--disable-wandb-random-suffix",
        action="store_false",
        dest="wandb_random_suffix",
        help="name the run exactly --wandb-group, without the random 6-character suffix",
    )
    g.add_argument(
        "--wandb-always-use-train-step",
        action="store_true",
        help="accepted for slime scripts: every metric is logged at its rollout step here",
    )
    g.add_argument(
        "--wandb-run-id",
        default=None,
        help="resume this W&B run (default: a resumed run (--load) continues the run it logged to before)",
    )


def settle_observe(args: Any, parser: argparse.ArgumentParser) -> None:
    """Check the logging flags; give the run its id (`args.run_id`)."""
    if args.log_samples_count < 0:
        parser.error(f"--log-samples-count must be >= 0, got {args.log_samples_count}")
    if args.log_samples_interval < 1:
        parser.error(f"--log-samples-interval must be >= 1, got {args.log_samples_interval}")
    args.run_id = run_id_for(args)
    if not args.use_wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        parser.error("--use-wandb needs the wandb package: pip install wandb")
    if args.wandb_key is not None and not args.wandb_key.strip():
        parser.error("--wandb-key is empty")


def run_id_for(args: Any) -> str:
    """The id every file of the run carries: the earlier run's (from <--output-dir>/run.json) when --load resumes
    it, else a new one: start time and 6 random hex digits."""
    record = os.path.join(args.output_dir, "run.json")
    if args.load and os.path.exists(record):
        try:
            with open(record) as f:
                return json.load(f)["run_id"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged record: the resumed run gets a new id
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
