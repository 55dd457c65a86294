import asyncio
import json
import random
import time
from types import SimpleNamespace

import pytest

from slime.rollout.rm_hub import async_rm
from slime.rollout.rm_hub.math_utils import grade_math, last_boxed
from slime.rollout.scoring import score_sample
from slime.utils.types import Sample
from tests.conftest import SHARED_DATA

# (response, label, expected): equivalent forms and near misses, by hand
MATH_CASES = [
    ("The answer is 12.", "12", 1.0),
    ("12 + 7 = 19", "12", 0.0),
    ("12 + 7 = 19", "19", 1.0),
    ("so \\boxed{\\frac{1}{2}} and then 7", "0.5", 1.0),  # the boxed answer wins over a later number
    ("Total: $1,200", "1200", 1.0),
    ("\\boxed{3} no wait \\boxed{4}", "3", 0.0),
    ("I don't know", "5", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0),
    ("\\boxed{\\tfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\frac12}", "0.5", 1.0),
    ("\\boxed{10\\%}", "10", 1.0),
    ("\\boxed{50\\%}", "0.5", 1.0),
    ("\\boxed{\\$5.00}", "5", 1.0),
    ("The answer is $5.00.", "5", 1.0),
    ("\\boxed{x=3}", "3", 1.0),
    ("\\boxed{x = -3}", "-3", 1.0),
    ("\\boxed{(1, 2]}", "(1,2]", 1.0),
    ("\\boxed{[1,2]}", "(1,2)", 0.0),  # closed vs open interval
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("#### 1,234,567", "1234567", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("The answer is 72 clips.", "72", 1.0),
    ("Final answer: 5 dollars", "5", 1.0),
    ("Answer: 3.5", "7/2", 1.0),
    ("Answer: 3.5", "3", 0.0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),  # a rounded decimal is not the exact value
    ("\\boxed{3}", "3.0001", 0.0),
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{\\pi}", "3.14159", 0.0),
    ("\\boxed{2\\pi}", "2\\pi", 1.0),
    ("\\boxed{\\pi r^2}", "\\pi r^{2}", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{x^2+2x}", "(x+1)^2", 0.0),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2, 3\\}", 0.0),
    ("\\boxed{12}", "12.0", 1.0),
    ("\\boxed{012}", "12", 1.0),
    ("\\boxed{1.5}", "\\frac{3}{2}", 1.0),
    ("\\boxed{\\frac{6}{4}}", "\\frac{3}{2}", 1.0),
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{2^{10}}", "1000", 0.0),
    ("\\boxed{\\sqrt{16}}", "4", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "-0.5", 0.0),
    ("Step 1: 3+4=7. #### 7", "7", 1.0),
    ("Step 1: 3+4=7. #### 8", "7", 0.0),
    ("she answered 43-3=40 correctly.\n#### 40", "40", 1.0),  # "answered" is not a marker
    ("The answer is 40. Checking: 40 + 2 = 42", "40", 1.0),  # the marker wins over a later number
    ("The answer is \\(\\frac{2}{3}\\).", "2/3", 1.0),
    ("the final answer is $\\frac{2}{3}$", "0.6667", 0.0),
    ("So x equals 9", "9", 1.0),
    ("So x equals 9", "8", 0.0),
    ("", "1", 0.0),
    ("\\boxed{}", "1", 0.0),
    ("\\boxed{\\text{no solution}}", "5", 0.0),
    ("There are 3 apples and 4 pears, so 7 fruits in total", "7", 1.0),
    ("\\boxed{7} fruits", "7", 1.0),
    ("\\boxed{1e3}", "1000", 0.0),  # documented limitation: scientific notation is not parsed as a number
]


@pytest.mark.parametrize("response, label, expected", MATH_CASES)
def test_grade_math(response, label, expected):
    assert grade_math(response, label) == expected


@pytest.mark.parametrize("response, label, expected", MATH_CASES)
def test_deepscaler_on_the_math_table(response, label, expected):
    """The same tricky answers after a closed thinking part that holds a decoy answer."""
    wrapped = f"<think>so the answer is \\boxed{{999}}. Hmm.</think>{response}"
    assert asyncio.run(async_rm(args(rm_type="deepscaler"), Sample(response=wrapped, label=label))) == expected


DAPO_CASES = [(last_boxed(r), label, e) for r, label, e in MATH_CASES if last_boxed(r) is not None]


@pytest.mark.parametrize("answer, label, expected", DAPO_CASES)
def test_dapo_on_the_math_table(answer, label, expected):
    """Each boxed answer of the math table written as DAPO's `Answer:` line: non-integers, LaTeX, units."""
    response = f"Reasoning: 999 is a decoy.\nAnswer: {answer}"
    out = asyncio.run(async_rm(args(rm_type="dapo"), Sample(response=response, label=label)))
    assert out["score"] == (1.0 if expected else -1.0) and out["pred"] == answer.strip()


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>maybe 3</think> The answer is \\boxed{4}", 1.0),
        ("<think>the answer is \\boxed{4}, no wait", 0.0),  # thinking never closed
        ("###Response\n#### 4", 1.0),
        ("<think>\\boxed{4}</think> so 5", 0.0),  # only what follows the thinking counts
    ],
)
def test_deepscaler(response, expected):
    assert asyncio.run(async_rm(args(rm_type="deepscaler"), Sample(response=response, label="4"))) == expected


def test_boxed_prefix_grades_only_the_boxed_answer():
    rm = args(rm_type="boxed_math")
    assert asyncio.run(async_rm(rm, Sample(response="\\boxed{4} then 5", label="4"))) == 1.0
    assert asyncio.run(async_rm(rm, Sample(response="The answer is 4", label="4"))) == 0.0  # no box, no reward
    with pytest.raises(ValueError, match="boxed_<type>"):
        asyncio.run(async_rm(args(rm_type="boxed_nope"), Sample(response="1", label="1")))
    with pytest.raises(ValueError, match="boxed_<type> for"):  # dapo reads `Answer:`, never a box
        asyncio.run(async_rm(args(rm_type="boxed_dapo"), Sample(response="\\boxed{1}", label="1")))
    gpqa = args(rm_type="boxed_gpqa")
    assert asyncio.run(async_rm(gpqa, Sample(response="Answer: A, no: \\boxed{C}", label="C"))) == 1.0


def _gsm8k_rows():
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    return [json.loads(line) for line in open(path)]


def test_gsm8k_labels_agree_with_their_reference_solutions():
    """Every GSM8K train label against the final line of its own solution (all 7,473 agree), against the same
    solution ending in a boxed answer, and against a perturbed final answer (none agree)."""
    rows = _gsm8k_rows()
    assert len(rows) > 7000
    agree = sum(grade_math(r["metadata"]["solution"], r["label"]) for r in rows)
    assert agree == len(rows)
    rng = random.Random(0)
    sample = rng.sample(rows, 500)
    for r in sample:
        body, label = r["metadata"]["solution"].rsplit("####", 1)[0], r["label"]
        value = float(label)
        wrong = str(int(value) + rng.choice([-1, 1, 10])) if value == int(value) else str(value + 1)
        assert grade_math(body + f"The answer is $\\boxed{{{label}}}$.", label) == 1.0
        assert grade_math(body + "#### " + wrong, label) == 0.0, (body, wrong, label)


def test_pathological_responses_return_quickly():
    start = time.monotonic()
    assert grade_math("1 " * 50_000 + "\\boxed{" * 3000 + "2" + "}" * 3000, "2") in (0.0, 1.0)
    assert grade_math("x" * 100_000, "2") == 0.0
    assert grade_math("{" * 50_000 + "#### 2", "2") == 1.0
    assert time.monotonic() - start < 10


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("none") is None


def args(**kw):
    base = dict(rm_type="math", custom_rm_path=None, reward_on_error=0.0)
    return SimpleNamespace(**{**base, **kw})


def test_selection_order():
    s = Sample(response="42", label="42", response_length=7, tokens=list(range(9)))
    assert asyncio.run(async_rm(args(), s)) == 1.0
    assert asyncio.run(async_rm(args(custom_rm_path="tests.custom_hooks:length_reward"), s)) == 7.0
    s.metadata["custom_rm_path"] = "tests.custom_hooks.length_reward"
    assert asyncio.run(async_rm(args(rm_type="random"), s)) == 7.0
    s2 = Sample(response="1", label="1", metadata={"rm_type": "math"})
    assert asyncio.run(async_rm(args(rm_type="random"), s2)) == 1.0
    with pytest.raises(ValueError, match="unknown rm_type 'nope'"):
        asyncio.run(async_rm(args(rm_type="nope"), Sample(response="1", label="1")))


def test_failing_reward_is_scored_marked_and_run_goes_on():
    s = Sample(response="x", label="1", index=3)
    asyncio.run(score_sample(args(custom_rm_path="tests.custom_hooks:failing_reward", reward_on_error=-1.0), s))
    assert s.reward == -1.0 and "grader exploded" in s.metadata["reward_error"]


def test_slow_reward_times_out_and_run_goes_on():
    s = Sample(response="x", label="1", index=4)
    start = time.monotonic()
    asyncio.run(score_sample(args(custom_rm_path="tests.custom_hooks:slow_reward", rm_timeout=0.5), s))
    assert time.monotonic() - start < 5
    assert s.reward == 0.0 and "--rm-timeout 0.5" in s.metadata["reward_error"]


@pytest.mark.parametrize(
    "response, label, score",
    [
        ("work...\nAnswer: 42", "42", 1.0),
        ("Answer: 41\nno wait\nAnswer: 42", "42", 1.0),  # the last one counts
        ("Answer: 3/4", "0.75", 1.0),  # non-integer labels grade correctly
        ("Answer: \\frac{3}{4}", "\\frac{3}{4}", 1.0),
        ("Answer: 2.5", "5/2", 1.0),
        ("Answer: 0.7", "0.75", -1.0),
        ("the answer is 42", "42", -1.0),  # DAPO needs the `Answer:` line
        ("Answer: 42" + " filler" * 100, "42", -1.0),  # only the final 300 characters are read
    ],
)
def test_dapo(response, label, score):
    out = asyncio.run(async_rm(args(rm_type="dapo"), Sample(response=response, label=label)))
    assert out["score"] == score and out["acc"] == (score == 1.0)
    assert Sample(reward=out).get_reward_value(SimpleNamespace(reward_key="score")) == score


@pytest.mark.parametrize(
    "response, label, f1",
    [
        ("Paris", "paris", 1.0),
        ("The capital is Paris.", "Paris", 0.5),  # 'capital is paris' vs 'paris': P 1/3, R 1
        ("Answer: the Eiffel Tower", "Eiffel Tower", 1.0),
        ("London", "Paris", 0.0),
        ("New York City", "New York|NYC", 0.8),
    ],
)
def test_f1(response, label, f1):
    assert asyncio.run(async_rm(args(rm_type="f1"), Sample(response=response, label=label))) == pytest.approx(f1)


@pytest.mark.parametrize(
    "response, label, score",
    [
        ("Reasoning... Answer: (C)", "C", 1.0),
        ("The answer is B", "(B)", 1.0),
        ("\\boxed{D}", "D) 42 kelvin", 1.0),
        ("Answer: A\nActually, answer: B", "A", 0.0),
        ("I think it could be anything", "A", 0.0),
        ("C", "C", 1.0),
    ],
)
def test_gpqa(response, label, score):
    assert asyncio.run(async_rm(args(rm_type="gpqa"), Sample(response=response, label=label))) == score
