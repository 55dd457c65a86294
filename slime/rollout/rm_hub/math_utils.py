"""Math answer grading with math-verify: last `\\boxed{}` if any, else the last expression in the response."""

from __future__ import annotations

import logging
import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call with our timeout=None
_EXTRACT = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def _parse(text: str) -> list:
    # parsing_timeout=None: math-verify's own timeout uses signals, which only work in the main thread
    return parse(text, extraction_config=_EXTRACT, parsing_timeout=None)


def grade_math(response: str, label: str) -> float:
    """1.0 when the response's final answer equals the label (symbolically or numerically), else 0.0."""
    boxed = last_boxed(response)
    answer = _parse(f"${boxed}$" if boxed is not None else re.sub(r"[,$]", "", response[-300:]))
    gold = _parse(label if "\\" in label or "$" in label else f"${label}$")
    if not answer or not gold:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0
