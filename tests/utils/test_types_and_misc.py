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


def test_append_response_tokens_keeps_masks_log_probs_and_status_aligned():
    from slime.utils.types import SampleAlignmentError

    s = Sample(tokens=[1, 2, 3])
    meta = {"weight_version": "7", "finish_reason": {"type": "length"}}
    s.append_response_tokens(None, tokens=[4, 5], log_probs=[-0.5, -0.25], meta_info=meta, text="ab")
    s.append_response_tokens(None, tokens=[6], trainable=False, text="c")
    assert s.tokens == [1, 2, 3, 4, 5, 6] and s.response == "abc" and s.response_length == 3
    assert s.loss_mask == [1, 1, 0] and s.rollout_log_probs == [-0.5, -0.25, 0.0]
    assert s.weight_versions == ["7"] and s.status == Sample.Status.TRUNCATED
    with pytest.raises(SampleAlignmentError, match="need their rollout log-probs"):
        s.append_response_tokens(None, tokens=[7])
    with pytest.raises(SampleAlignmentError, match="take no log-probs"):
        s.append_response_tokens(None, tokens=[7], log_probs=[-1.0], trainable=False)
    bare = Sample(tokens=[1, 2], response_length=1)
    with pytest.raises(SampleAlignmentError, match="have no rollout log-probs"):
        bare.append_response_tokens(None, tokens=[3], log_probs=[-1.0])


@pytest.mark.parametrize(
    "response, strict, score",
    [
        ("so the answer is\\boxed{\\frac{1}{2}}", True, 1.0),
        ("Answer: 0.5", True, -1.0),  # strict: only a box counts
        ("Answer: 0.5", False, 1.0),
        ("\\boxed{3}", True, -1.0),
    ],
)
def test_math_dapo_utils_compute_score(response, strict, score):
    from slime.rollout.rm_hub.math_dapo_utils import compute_score

    out = compute_score(response, "1/2", strict_box_verify=strict)
    assert out["score"] == score and out["acc"] == (score > 0)


def test_append_response_tokens_extends_the_lists_in_place():
    """slime's retool example keeps `loss_masks = sample.loss_mask` and assigns it back at the end: the appended
    entries must be in that list."""
    s = Sample(tokens=[1, 2])
    s.loss_mask = []
    held = s.loss_mask
    s.append_response_tokens(None, tokens=[5, 6], log_probs=[-0.1, -0.2])
    s.append_response_tokens(None, tokens=[7], trainable=False)
    s.loss_mask = held
    assert held == [1, 1, 0] and s.tokens == [1, 2, 5, 6, 7]
    s.check_alignment()
