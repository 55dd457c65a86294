"""How old a sample's weights are when it is trained, and the --max-staleness bound.

Versions count training steps: the engines start at version 0 (the --hf-checkpoint weights, reported as "default"
by SGLang-style servers), and the sync after rollout k sets version k + 1. Rollout k is trained at step k on the
weights of version k, so a sample generated on version v is k - v steps stale when rollout k trains it: 0 in the
synchronous loop, 1 with one-step overlap (`--async`), anything in fully asynchronous rollouts. A partial rollout
spans several versions; its oldest counts.
"""

from __future__ import annotations

import collections

from slime.utils.types import Sample

_engine_version = 0  # this process's view of the engines' weights (set by the rollout manager after each sync)


def set_engine_version(version: str | None) -> None:
    """Record that every engine now serves weight `version` (None: the starting weights)."""
    global _engine_version
    _engine_version = version_number(version) if version is not None else 0


def engine_version() -> int:
    """The version the engines serve now, as a step count: generation that starts now is at least this new."""
    return _engine_version


def version_number(version: str) -> int:
    """A weight version as a step count ("default", or anything not a number, is the starting weights: 0)."""
    return int(version) if version.isdigit() else 0


def staleness(sample: Sample, rollout_id: int) -> int:
    """Steps between the oldest weights that generated `sample` and the step that trains it (0 if it has none)."""
    if not sample.weight_versions:
        return 0
    return max(0, rollout_id - min(version_number(v) for v in sample.weight_versions))


def split_stale(
    groups: list[list[Sample]], rollout_id: int, max_staleness: int | None
) -> tuple[list[list[Sample]], list[list[Sample]]]:
    """(fresh groups, stale groups): a group is stale when any of its samples is more than `max_staleness` steps
    old for rollout `rollout_id` (a group is trained whole: its advantages are relative to each other)."""
    if max_staleness is None:
        return groups, []
    fresh, stale = [], []
    for group in groups:
        old = any(staleness(s, rollout_id) > max_staleness for s in group)
        (stale if old else fresh).append(group)
    return fresh, stale


def staleness_metrics(groups: list[list[Sample]], rollout_id: int) -> dict[str, float]:
    """train/staleness_mean, _max and a histogram: train/staleness_samples_<n> = samples n steps old."""
    ages = [staleness(s, rollout_id) for g in groups for s in g]
    if not ages:
        return {}
    counts = collections.Counter(ages)
    return {
        "train/staleness_mean": sum(ages) / len(ages),
        "train/staleness_max": max(ages),
        **{f"train/staleness_samples_{n}": counts[n] for n in sorted(counts)},
    }
