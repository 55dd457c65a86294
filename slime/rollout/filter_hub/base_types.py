"""What a dynamic-sampling filter returns (public import path)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DynamicFilterOutput:
    """`keep`: the group goes into the training batch. `reason`: why not, counted as `rollout/dropped/<reason>`.
    `keep_when_insufficient`: keep a rejected group anyway when dropping it would leave fewer groups (kept and still
    generating) than the step needs, so a filter can prefer good groups without forcing another sampling round."""

    keep: bool
    reason: str | None = None
    keep_when_insufficient: bool = False
