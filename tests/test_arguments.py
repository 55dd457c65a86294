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
        (["--use-kl-loss", "--kl-coef", "0.1"], "--use-kl-loss and --kl-coef both penalise"),
        (["--advantage-estimator", "dpo"], "choose one of ['grpo', 'gspo', 'on_policy_distillation', 'ppo'"),
        (["--loss-type", "custom_loss"], "--loss-type custom_loss and --custom-loss-function-path go together"),
        (["--use-tis", "--use-rollout-logprobs"], "with --use-rollout-logprobs the two are the same"),
        (["--use-tis", "--tis-clip", "0.5", "--tis-clip-low", "0.5"], "--tis-clip-low 0.5 must be >= 0 and below"),
        (["--use-mis", "--mis-lower-bound", "0"], "--mis-lower-bound 0.0 must be > 0"),
        (["--advantage-estimator", "on_policy_distillation"], "needs a teacher: --opd-teacher-load PATH"),
        (["--use-opd", "--opd-type", "megatron"], "--opd-type megatron needs --opd-teacher-load"),
        (["--opd-teacher-load", "t"], "--opd-teacher-load without --use-opd"),
        (["--gamma", "0"], "--gamma must be in (0, 1]"),
        (["--rm-type", "remote_rm"], "--rm-type remote_rm needs --rm-url"),
        (["--rm-type", "boxed_f1"], "--rm-type: unknown rm_type 'boxed_f1'"),
        (["--rm-type", "maths"], "--rm-type: unknown rm_type 'maths'; built-in: ['dapo'"),
        (["--rm-timeout", "0"], "--rm-timeout must be positive"),
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


@pytest.mark.parametrize(
    "extra, gbs, steps",
    [
        (["--rollout-batch-size", "8", "--n-samples-per-prompt", "4"], 32, 1),
        (["--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--num-steps-per-rollout", "4"], 8, 4),
        (["--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--global-batch-size", "16"], 16, 2),
        (["--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--global-batch-size", "4",
          "--num-steps-per-rollout", "2"], 4, 2),
    ],
)  # fmt: skip
def test_batch_plan_fills_in_the_missing_side(extra, gbs, steps):
    from slime.config.arguments import batch_plan

    a = parse_args(BASE + extra)
    assert (a.global_batch_size, a.num_steps_per_rollout) == (gbs, steps)
    assert f"{steps} optimizer step(s) of {gbs} samples" in batch_plan(a)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--global-batch-size", "12"],
         "32 samples is not a multiple of --global-batch-size 12"),
        (["--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--global-batch-size", "8",
          "--num-steps-per-rollout", "2"], "--global-batch-size 8 x --num-steps-per-rollout 2 = 16"),
        (["--rollout-batch-size", "3", "--n-samples-per-prompt", "2", "--num-steps-per-rollout", "4"],
         "do not split into --num-steps-per-rollout 4"),
        (["--rollout-batch-size", "3", "--n-samples-per-prompt", "1", "--actor-num-gpus-per-node", "2"],
         "does not split evenly over 2 training ranks"),
        (["--rollout-batch-size", "4", "--n-samples-per-prompt", "1", "--micro-batch-size", "3"],
         "not a multiple of --micro-batch-size 3"),
        (["--use-dynamic-batch-size"], "--use-dynamic-batch-size needs --max-tokens-per-gpu"),
        (["--advantage-estimator", "nope"], "--advantage-estimator 'nope'"),
        (["--eps-clip-c", "0.5"], "--eps-clip-c must be greater than 1"),
    ],
)  # fmt: skip
def test_inconsistent_batch_settings_are_refused_naming_the_flags(capsys, extra, message):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert message in capsys.readouterr().err


def test_algorithm_defaults_and_implications():
    a = parse_args(BASE + ["--advantage-estimator", "reinforce_plus_plus", "--lr", "3e-6"])
    assert a.normalize_advantages  # REINFORCE++ is defined with batch whitening
    assert a.critic_lr == 3e-6 and a.eps_clip_high == a.eps_clip == 0.2 and a.loss_type == "policy_loss"
    b = parse_args(BASE + ["--use-opd", "--opd-teacher-load", "teacher"])
    assert b.opd_type == "model"
