import pytest

from slime.utils.misc import load_function
from slime.utils.types import Sample, SampleAlignmentError


def test_status_values_match_slime():
    assert {s.name for s in Sample.Status} == {"PENDING", "COMPLETED", "TRUNCATED", "ABORTED", "FAILED"}


def test_append_response_keeps_lists_aligned():
    s = Sample(prompt="p", tokens=[1, 2, 3])
    s.append_response([10, 11], "ab", loss_mask=1, log_probs=[-0.1, -0.2])
    s.append_response([12], "tool", loss_mask=0)
    assert s.tokens == [1, 2, 3, 10, 11, 12] and s.response_length == 3 and s.prompt_length == 3
    assert s.loss_mask == [1, 1, 0] and s.rollout_log_probs == [-0.1, -0.2, 0.0]
    assert s.effective_response_length == 2 and s.response == "abtool"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"loss_mask": [1]}, "loss_mask"),
        ({"rollout_log_probs": [0.0, 0.0, 0.0]}, "rollout_log_probs"),
        ({"response_length": 9}, "response_length"),
    ],
)
def test_misalignment_raises_naming_the_field(kwargs, field):
    s = Sample(tokens=[1, 2, 3, 4], **{"response_length": 2, **kwargs})
    with pytest.raises(SampleAlignmentError, match=field):
        s.check_alignment()


def test_append_rejects_wrong_logprob_count():
    with pytest.raises(SampleAlignmentError, match="2 log_probs for 1 tokens"):
        Sample(tokens=[1]).append_response([5], log_probs=[-1.0, -2.0])


def test_reward_value_with_reward_key():
    class A:
        reward_key = "acc"

    assert Sample(reward={"acc": 1, "fmt": 0}).get_reward_value(A) == 1.0
    with pytest.raises(ValueError, match="--reward-key"):
        Sample(reward={"acc": 1}).get_reward_value(object())


def test_round_trip_dict():
    s = Sample(prompt="x", tokens=[1], status=Sample.Status.TRUNCATED, metadata={"a": 1})
    assert Sample.from_dict(s.to_dict()) == s


def test_load_function_both_forms():
    assert load_function("os.path:join") is load_function("os.path.join")
    assert load_function("slime.utils.types:Sample.from_dict") == Sample.from_dict


@pytest.mark.parametrize(
    "path, match",
    [("no_such_mod.fn", "cannot import module 'no_such_mod'"), ("os.path:nope", "no attribute 'nope'"), ("x", "")],
)
def test_load_function_errors_name_flag_and_path(path, match):
    with pytest.raises((ImportError, ValueError), match=f"--custom-rm-path '{path}'.*{match}"):
        load_function(path, "--custom-rm-path")
