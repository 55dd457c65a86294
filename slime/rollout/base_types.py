"""Return types of rollout functions (public import path)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slime.utils.types import Sample


@dataclass
class RolloutFnTrainOutput:
    samples: list[list[Sample]]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutFnEvalOutput:
    data: dict[str, dict[str, Any]]  # dataset name -> {"rewards": [...], "truncated": [...], "samples": [...]}
    metrics: dict[str, Any] = field(default_factory=dict)
