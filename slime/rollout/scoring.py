"""Scoring generated samples: the reward boundary of the default rollout.

Which function grades a sample is rm_hub's selection order; here is what the rollout does with the answer: one
return convention (a finite number, or a dict holding the `--reward-key` scalar), checked with the function named,
and one failure policy — a grading that raises, times out (`--rm-timeout`) or breaks the convention gives the sample
`--reward-on-error`, is marked in `metadata["reward_error"]`, logged once per kind, counted, and the run goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
from typing import Any

from slime.rollout.rm_hub import async_rm, batched_async_rm
from slime.utils.types import Sample

logger = logging.getLogger(__name__)


def reward_key(args: Any, evaluation: bool = False) -> str | None:
    """The key of the scalar in dict rewards: `--eval-reward-key` (else `--reward-key`) for evaluation."""
    if evaluation and getattr(args, "eval_reward_key", None):
        return args.eval_reward_key
    return getattr(args, "reward_key", None)


def reward_source(args: Any, sample: Sample) -> str:
    """Which reward function grades `sample`, by the selection order, for error messages."""
    if sample.metadata.get("custom_rm_path"):
        return f"metadata custom_rm_path {sample.metadata['custom_rm_path']}"
    if getattr(args, "custom_rm_path", None):
        return f"--custom-rm-path {args.custom_rm_path}"
    return f"rm_type {sample.metadata.get('rm_type') or getattr(args, 'rm_type', None)}"


def check_reward(reward: Any, key: str | None, source: str) -> float | dict:
    """The one return convention: a finite real number, or a dict whose `key` entry is one."""
    if isinstance(reward, dict):
        if not key:
            raise TypeError(
                f"{source} returned a dict with keys {sorted(reward)}; choose the scalar with "
                "--reward-key (and --eval-reward-key for evaluation)"
            )
        if key not in reward:
            raise KeyError(f"{source} returned a dict without the reward key {key!r}: keys {sorted(reward)}")
        check_reward(reward[key], None, f"{source} [{key!r}]")
        return reward
    if not isinstance(reward, numbers.Real):
        raise TypeError(
            f"{source} returned {type(reward).__name__} {str(reward)[:80]!r}; a reward is a float or "
            "a dict holding the --reward-key scalar"
        )
    if not math.isfinite(reward):
        raise ValueError(f"{source} returned {reward}")
    return float(reward)


_logged_tracebacks: set[tuple[str, str]] = set()


def _mark_failed(args: Any, sample: Sample, exc: BaseException, source: str) -> None:
    """Give the sample `--reward-on-error`, record why in its metadata, and log it (the traceback once per kind)."""
    sample.reward = args.reward_on_error
    if isinstance(exc, TimeoutError) and not str(exc):  # a grader in a thread keeps running; its result is dropped
        why = f"TimeoutError: took longer than --rm-timeout {args.rm_timeout}s"
    else:
        why = f"{type(exc).__name__}: {exc}"
    sample.metadata["reward_error"] = f"{source}: {why}"
    first = (source, type(exc).__name__) not in _logged_tracebacks
    _logged_tracebacks.add((source, type(exc).__name__))
    logger.warning(
        "reward of sample %s failed (%s); it gets --reward-on-error %s",
        sample.index,
        sample.metadata["reward_error"],
        args.reward_on_error,
        exc_info=exc if first else None,
    )


async def score_sample(args: Any, sample: Sample, evaluation: bool = False) -> None:
    """Grade one sample; a reward function that raises, times out or breaks the return convention is caught."""
    source = reward_source(args, sample)
    try:
        reward = await asyncio.wait_for(async_rm(args, sample), getattr(args, "rm_timeout", None))
        sample.reward = check_reward(reward, reward_key(args, evaluation), source)
    except Exception as exc:  # one broken grading must not end the run: score it, mark it, count it
        _mark_failed(args, sample, exc, source)


async def score_group(args: Any, samples: list[Sample], evaluation: bool = False) -> None:
    """`--group-rm` with `--custom-rm-path`: one call grades the group; if it fails, every sample is marked."""
    source = f"--custom-rm-path {args.custom_rm_path} called with a list of samples (--group-rm)"
    try:
        rewards = await asyncio.wait_for(batched_async_rm(args, samples), getattr(args, "rm_timeout", None))
    except Exception as exc:
        for sample in samples:
            _mark_failed(args, sample, exc, source)
        return
    for sample, reward in zip(samples, rewards, strict=True):
        try:
            sample.reward = check_reward(reward, reward_key(args, evaluation), source)
        except Exception as exc:
            _mark_failed(args, sample, exc, source)


def scalar_reward(sample: Sample, key: str | None) -> float | None:
    """The sample's reward as a number (`key` picks it from a dict); None when it was never graded."""
    reward = sample.reward[key] if isinstance(sample.reward, dict) and key in sample.reward else sample.reward
    return float(reward) if isinstance(reward, numbers.Real) else None
