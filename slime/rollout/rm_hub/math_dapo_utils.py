"""DAPO's math grader at slime's import path (`slime.rollout.rm_hub.math_dapo_utils.compute_score`), as slime's
example agents call it. The comparison itself is this project's math-verify grading (slime.rollout.rm_hub)."""

from __future__ import annotations

from typing import Any

from slime.rollout.rm_hub.math_utils import is_equivalent, last_boxed
from slime.rollout.rm_hub.text_graders import dapo_score


def compute_score(
    solution_str: str, ground_truth: str, strict_box_verify: bool = False, pause_tokens_index: Any = None
) -> dict:
    """{"score": 1.0 or -1.0, "acc": bool, "pred": the extracted answer}. Only the last 300 characters are read.
    Default: the last `Answer: X` is the prediction; `strict_box_verify`: the last `\\boxed{}` is (and none is
    wrong). `pause_tokens_index` is accepted for slime's signature and not used."""
    if not strict_box_verify:
        return dapo_score(solution_str, ground_truth)
    pred = last_boxed(solution_str[-300:]) or ""
    correct = bool(pred) and is_equivalent(pred, str(ground_truth))
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
