"""Math answer grading with math-verify.

The final answer of a response is, in order: the content of the last `\\boxed{}` (or `\\fbox{}`); else what follows
the last final-answer marker (`####`, `The answer is`, `Final answer:`, `Answer:`) up to the end of its sentence;
else the last number in the response's tail. It is compared with the label by math-verify (symbolic and numeric
equivalence, fractions, LaTeX, percentages, sets and intervals) after dropping dollar signs, thousands separators and
trailing unit words.
"""

from __future__ import annotations

import functools
import logging
import re

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call with our timeout=None
MAX_ANSWER_CHARS = 400  # a longer "answer" is not one; bounding it bounds math-verify's parse time
TAIL_CHARS = 4000  # final-answer markers are searched only here, so a 100 kB response costs as much as a short one
_MARKER = re.compile(
    r"(?:####|the (?:final )?answer is|final answer\s*[:：]|answer\s*[:：])[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_UNIT_TAIL = re.compile(r"^(.*?\d)\s*(?:[a-zA-Z][a-zA-Z ]*)?\.?$")


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


def extract_final_answer(response: str) -> str | None:
    """The response's final answer as text (see the module docstring), or None when it has none."""
    tail = response[-TAIL_CHARS:]
    boxed = last_boxed(tail)
    if boxed is not None:
        return boxed
    markers = [m.group(1).strip() for m in _MARKER.finditer(tail)]
    if markers and markers[-1]:
        return re.split(r"\.(?:\s|$)", markers[-1])[0]  # the answer's sentence, not what the response adds after
    numbers = _NUMBER.findall(tail[-300:])
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Drop what math-verify should not see: surrounding `$`, `\\$` and dollar signs, thousands separators
    (1,234,567), a trailing full stop, and unit words after a number ("72 clips", "5 dollars")."""
    text = answer.strip().replace("\\$", "").replace("$", "").strip()
    text = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), text)
    text = text.rstrip(".").strip()
    unit = _UNIT_TAIL.match(text)
    if unit and not re.search(r"\\|[a-zA-Z]\s*[=<>]", unit.group(1)):  # keep LaTeX and equations whole
        text = unit.group(1)
    return text


@functools.cache
def _math_verify() -> tuple:
    """math-verify's parse, verify and extraction settings, imported on first use (the import costs half a second
    in every process that merely imports the reward hub)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    return parse, verify, [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _parse(text: str) -> list:
    parse, _, extract = _math_verify()
    # parsing_timeout=None: math-verify's own timeout uses signals, which only work in the main thread
    return parse(f"${text}$", extraction_config=extract, parsing_timeout=None)


def is_equivalent(answer: str, label: str) -> bool:
    """math-verify equivalence of two final answers (normalised first); False when either does not parse."""
    answer, label = normalize_answer(answer), normalize_answer(label)
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    if answer == label:
        return True
    gold, pred = _parse(label), _parse(answer)
    return bool(gold and pred and _math_verify()[1](gold, pred, timeout_seconds=None))


def grade_math(response: str, label: str) -> float:
    """1.0 when the response's final answer equals the label (symbolically or numerically), else 0.0."""
    answer = extract_final_answer(response)
    return 1.0 if answer is not None and is_equivalent(answer, str(label)) else 0.0
