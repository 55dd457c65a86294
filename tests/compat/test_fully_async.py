"""slime's fully-async rollout function: generation continues across rollout boundaries and each step takes the
groups that finished first."""

import json

import pytest

from slime.config.arguments import parse_args

FLAGS = (
    "--prompt-data builtin:arithmetic:train:64:0 --input-key prompt --custom-rm-path tests.custom_hooks.token_reward "
    "--rollout-function-path slime.rollout.fully_async_rollout.generate_rollout_fully_async "
    "--rollout-batch-size 2 --n-samples-per-prompt 2 --global-batch-size 4 --rollout-max-response-len 8 --lr 0.01 "
    "--sglang-server-concurrency 2"
)


def test_fully_async_rollout_trains_with_a_warm_queue(ray_cluster, tiny_model_path, tmp_path):
    """Three steps: the worker keeps groups generating while the trainer trains (the queue is never empty after
    the first step), aborted groups at each sync go back to the data source, and evaluation runs the default
    rollout."""
    from slime.train import train

    out = tmp_path / "run"
    flags = f"--hf-checkpoint {tiny_model_path} {FLAGS} --num-rollout 3 --output-dir {out} --colocate "
    flags += "--eval-prompt-data small builtin:arithmetic:test:2:0 --eval-interval 3"
    train(parse_args(flags.split()))
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [s for s in lines if "train/loss" in s]
    assert [s["train/optimizer_steps"] for s in steps] == [1, 2, 3]
    assert all(s["train/grad_norm"] > 0 for s in steps)
    # concurrency 2 x 1 engine: up to 2 groups generating and 2 queued beyond what a step takes
    assert all(0 <= s["rollout/queued_groups"] <= 2 and s["rollout/generating_groups"] <= 2 for s in steps)
    assert all(s["rollout/weight_version_lag"] >= 0 for s in steps)
    # the engines pause (aborting) to free their memory for training: the groups they held went back, not lost
    assert steps[-1]["rollout/requeued_groups"] > 0
    assert any("eval/small/reward_mean" in s for s in lines)


def test_a_broken_generate_function_stops_the_fully_async_rollout(ray_cluster, tiny_model_path, tmp_path):
    from slime.train import train

    flags = f"--hf-checkpoint {tiny_model_path} {FLAGS} --num-rollout 1 --output-dir {tmp_path / 'run'} "
    flags += "--custom-generate-function-path tests.custom_hooks.returns_a_number"
    with pytest.raises(Exception, match="fully-async rollout worker stopped: TypeError.*returned int"):
        train(parse_args(flags.split()))
