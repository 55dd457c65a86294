"""Checks shared by the flag groups: every refusal names the flag as the user typed it."""

from __future__ import annotations

import argparse
from typing import Any


def flag(dest: str) -> str:
    """The command-line spelling of an argparse destination: rollout_batch_size -> --rollout-batch-size."""
    return "--" + dest.replace("_", "-")


def require_at_least_one(args: Any, parser: argparse.ArgumentParser, *dests: str) -> None:
    """Each of `dests` is at least 1; None counts as unset and passes."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value < 1:
            parser.error(f"{flag(dest)} must be at least 1, got {value}")
