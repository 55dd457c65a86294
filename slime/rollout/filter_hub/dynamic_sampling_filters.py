"""Built-in `--dynamic-sampling-filter-path` functions: `(args, samples: list[Sample], **kwargs) ->
DynamicFilterOutput | bool`, called once per graded group (public import path)."""

from __future__ import annotations

import math
from typing import Any

from slime.rollout.filter_hub.base_types import DynamicFilterOutput
from slime.utils.types import Sample

__all__ = ["check_reward_nonzero_std", "check_reward_nonzero_std_with_fallback", "check_no_aborted_or_failed"]


def check_reward_nonzero_std(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """Keep a group whose rewards differ (DAPO's dynamic sampling): with equal rewards every group-normalised
    advantage is 0 and the group teaches nothing. Dropped groups are counted as `zero_std_<reward>`."""
    rewards = [s.get_reward_value(args) for s in samples]
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(len(rewards) - 1, 1))
    keep = len(rewards) > 1 and std > 1e-6
    return DynamicFilterOutput(keep=keep, reason=None if keep else f"zero_std_{round(rewards[0], 1)}")


def check_reward_nonzero_std_with_fallback(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """`check_reward_nonzero_std`, but a zero-std group is kept when the step would otherwise fall short (no extra
    sampling round for it)."""
    out = check_reward_nonzero_std(args, samples, **kwargs)
    out.keep_when_insufficient = True
    return out


def check_no_aborted_or_failed(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """Keep a group only if every sample finished generating (none failed, none aborted)."""
    bad = [s.status.value for s in samples if s.status in (Sample.Status.FAILED, Sample.Status.ABORTED)]
    return DynamicFilterOutput(keep=not bad, reason=f"{bad[0]}_sample" if bad else None)
