"""Graders of short textual answers: DAPO's `Answer:` line, token F1 for QA, and multiple-choice letters."""

from __future__ import annotations

import re
import string
from collections import Counter

from slime.rollout.rm_hub.math_utils import is_equivalent

_PUNCTUATION = set(string.punctuation)
_DAPO_ANSWER = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)
_CHOICE = re.compile(
    r"(?:answer|choice|option)\s*(?:is|:)?\s*\(?\s*\**\s*([A-J])\b|\\boxed\{\s*\(?([A-J])\)?\s*\}|^\s*\(?([A-J])\)?[.)]?\s*$",
    re.IGNORECASE | re.MULTILINE,
)


def dapo_score(response: str, label: str) -> dict:
    """DAPO's rule: the last `Answer: X` within the response's final 300 characters is compared with the label.
    Any label math-verify understands works (fractions, decimals, LaTeX), not only integers.
    Returns {"score": 1.0 or -1.0, "acc": bool, "pred": the extracted answer or ""}; use `--reward-key score`."""
    found = _DAPO_ANSWER.findall(response[-300:])
    pred = found[-1].strip() if found else ""
    correct = bool(pred) and is_equivalent(pred, str(label))
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def _tokens(text: str) -> list[str]:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def f1_score(response: str, label: str) -> float:
    """Token-level F1 between the response (after its last `Answer:` if any) and the label; labels may list
    alternatives separated by `|`, and the best one counts."""
    found = _DAPO_ANSWER.findall(response)
    pred = _tokens(found[-1] if found else response)
    best = 0.0
    for gold_text in str(label).split("|"):
        gold = _tokens(gold_text)
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not pred and not gold:
            best = 1.0
    return best


def choice_letter(response: str) -> str | None:
    """The multiple-choice letter the response commits to: the last `Answer: (C)`, `\\boxed{C}`, `option C` or a
    line holding only the letter; None when there is none."""
    found = [next(g for g in m.groups() if g) for m in _CHOICE.finditer(response)]
    return found[-1].upper() if found else None


def gpqa_score(response: str, label: str) -> float:
    """1.0 when the committed letter equals the label's letter (`C`, `(C)` or `C) text`), else 0.0."""
    gold = re.match(r"\s*\(?([A-Ja-j])\b", str(label))
    pred = choice_letter(response)
    return 1.0 if gold and pred == gold.group(1).upper() else 0.0
