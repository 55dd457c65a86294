"""slime's training-side flags: --num-critic-only-steps, --keep-old-actor, --ref-update-interval,
--get-mismatch-metrics, --use-rollout-entropy."""

import json

import pytest

from slime.config.arguments import parse_args

BASE = (
    "--prompt-data builtin:arithmetic:train:64:0 --input-key prompt --custom-rm-path tests.custom_hooks.token_reward "
    "--rollout-batch-size 2 --n-samples-per-prompt 4 --global-batch-size 8 --rollout-max-response-len 8 --lr 0.02"
)


def _run(tiny_model_path, out, extra: str) -> list[dict]:
    from slime.train import train

    train(parse_args(f"--hf-checkpoint {tiny_model_path} {BASE} --output-dir {out} {extra}".split()))
    return [json.loads(x) for x in open(out / "metrics.jsonl")]


def test_critic_only_steps_leave_the_policy_alone(ray_cluster, tiny_model_path, tmp_path):
    extra = "--advantage-estimator ppo --num-critic-only-steps 1 --num-rollout 2"
    steps = _run(tiny_model_path, tmp_path / "run", extra)
    assert "train/grad_norm" not in steps[0] and steps[0]["critic/grad_norm"] > 0
    assert steps[1]["train/grad_norm"] > 0 and steps[1]["critic/grad_norm"] > 0


def test_old_actor_reference_updates_and_mismatch_metrics(ray_cluster, tiny_model_path, tmp_path):
    """Weights reach the engine every 2 rollouts. With --keep-old-actor the old log-probs of rollout 1 come from
    the weights the engine generated it with, so they match the engine's (the policy had moved on); the reference
    follows the policy every rollout, so the KL measured before each update is 0."""
    out = tmp_path / "run"
    steps = _run(
        tiny_model_path,
        out,
        "--num-rollout 3 --update-weights-interval 2 --keep-old-actor --use-kl-loss --kl-loss-coef 0.01 "
        "--ref-update-interval 1 --get-mismatch-metrics --use-rollout-entropy "
        "--rollout-data-postprocess-path tests.custom_hooks.record_entropy",
    )
    assert all(s["train/mismatch_logprob_abs_diff"] < 1e-4 for s in steps)
    assert all(s["train/kl_loss"] == pytest.approx(0.0, abs=1e-6) for s in steps)
    assert steps[0]["train/param_norm"] != steps[1]["train/param_norm"]
    seen = [json.loads(x) for x in open(out / "hooks.jsonl")]
    assert seen == [{"hook": "entropy", "all_shaped": True, "positive": True}] * 3


def test_the_same_run_without_the_old_actor_sees_the_mismatch(ray_cluster, tiny_model_path, tmp_path):
    """The control: rollout 1 was generated with the first weights, the trainer's policy has moved, the
    mismatch is visible."""
    extra = "--num-rollout 2 --update-weights-interval 2 --get-mismatch-metrics"
    steps = _run(tiny_model_path, tmp_path / "run", extra)
    assert steps[0]["train/mismatch_logprob_abs_diff"] < 1e-4 < steps[1]["train/mismatch_logprob_abs_diff"]
