import pytest

from slime.config.arguments import parse_args

BASE = ["--hf-checkpoint", "m", "--prompt-data", "d.jsonl", "--rm-type", "math"]


def test_defaults_follow_slime():
    a = parse_args(BASE)
    assert a.input_key == "input" and a.metadata_key == "metadata" and a.rollout_seed == 42
    assert a.rollout_function_path == "slime.rollout.sglang_rollout.generate_rollout"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rollout-top-p", "0"], "rollout sampling flags: sampling_params.top_p"),
        (["--eval-prompt-data", "only_a_name"], "--eval-prompt-data takes pairs"),
        (["--n-samples-per-prompt", "0"], "--n-samples-per-prompt must be at least 1"),
        (["--apply-chat-template-kwargs", "[1]"], "expected a JSON object"),
    ],
)
def test_bad_flags_are_refused_naming_them(capsys, extra, message):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert message in capsys.readouterr().err


def test_reward_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--hf-checkpoint", "m", "--prompt-data", "d.jsonl"])
    assert "--rm-type" in capsys.readouterr().err
