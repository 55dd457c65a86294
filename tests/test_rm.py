import asyncio
from types import SimpleNamespace

import pytest

from slime.rollout.rm_hub import async_rm
from slime.rollout.rm_hub.math_utils import grade_math, last_boxed
from slime.rollout.sglang_rollout import _reward
from slime.utils.types import Sample


@pytest.mark.parametrize(
    "response, label, expected",
    [
        ("The answer is 12.", "12", 1.0),
        ("12 + 7 = 19", "12", 0.0),
        ("12 + 7 = 19", "19", 1.0),
        ("so \\boxed{\\frac{1}{2}} and then 7", "0.5", 1.0),  # the boxed answer wins over a later number
        ("Total: $1,200", "1200", 1.0),
        ("\\boxed{3} no wait \\boxed{4}", "3", 0.0),
        ("I don't know", "5", 0.0),
    ],
)
def test_grade_math(response, label, expected):
    assert grade_math(response, label) == expected


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
    asyncio.run(_reward(args(custom_rm_path="tests.custom_hooks:failing_reward", reward_on_error=-1.0), s))
    assert s.reward == -1.0 and "grader exploded" in s.metadata["reward_error"]
