"""What a dynamic-sampling filter returns (public import path)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DynamicFilterOutput:
    """`keep`: the group goes into the training batch. `reason`: why not, counted as `rollout/dropped/<reason>`."""

    keep: bool
    reason: str | None = None
