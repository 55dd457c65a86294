"""slime's remaining hook flags, each called where slime calls it and with its signature (hooks in
tests/custom_hooks.py record what they saw)."""

import json
import pickle

import pytest

from slime.config.arguments import parse_args
from slime.rollout.manager import train_batch_from_dict

FLAG = "--custom-convert-samples-to-train-data-path"


def test_a_slime_train_data_dict_becomes_a_train_batch():
    data = {
        "tokens": [[1, 2, 3], [1, 4, 5, 6]],
        "response_lengths": [1, 2],
        "rewards": [1, 0],
        "loss_masks": [[1], [0, 1]],
        "rollout_ids": [7, 7],
    }
    batch = train_batch_from_dict(data, FLAG)
    assert batch.rewards == [1.0, 0.0] and batch.trajectories == [0, 0] and batch.rollout_log_probs == []
    with pytest.raises(KeyError, match="without \\['loss_masks'\\]"):
        train_batch_from_dict({k: v for k, v in data.items() if k != "loss_masks"}, FLAG)
    with pytest.raises(ValueError, match="loss_masks\\[1\\] has 1 entries, response_lengths says 2"):
        train_batch_from_dict(data | {"loss_masks": [[1], [1]]}, FLAG)
    with pytest.raises(TypeError, match="returned list"):
        train_batch_from_dict([], FLAG)


def test_custom_config_sets_attributes_before_the_checks(tiny_model_path, tmp_path):
    cfg = tmp_path / "custom.yaml"
    cfg.write_text("my_hook_value: 7\nrollout_temperature: 0.5\n")
    base = f"--hf-checkpoint {tiny_model_path} --prompt-data builtin:arithmetic --rm-type math".split()
    args = parse_args([*base, "--custom-config-path", str(cfg)])
    assert args.my_hook_value == 7 and args.rollout_temperature == 0.5
    cfg.write_text("- a list\n")
    with pytest.raises(SystemExit):
        parse_args([*base, "--custom-config-path", str(cfg)])


def test_slime_hooks_are_called_in_the_loop(ray_cluster, tiny_model_path, tmp_path, write_jsonl):
    """One run with every remaining slime hook: the sample filter removes samples from the loss, the all-samples
    hook sees the groups dynamic sampling dropped too, the log functions replace the standard metrics, the custom
    conversion, advantage and post-process hooks shape what the trainer optimises."""
    from slime.train import train

    cfg = tmp_path / "custom.yaml"
    cfg.write_text("my_hook_value: 7\n")
    out, dump = tmp_path / "run", tmp_path / "rollout_{rollout_id}.pkl"
    hooks = "tests.custom_hooks"
    flags = (
        f"--hf-checkpoint {tiny_model_path} --prompt-data builtin:arithmetic:train:64:0 --input-key prompt "
        f"--custom-rm-path {hooks}.token_reward --rollout-batch-size 2 --n-samples-per-prompt 2 "
        "--over-sampling-batch-size 4 --global-batch-size 4 --rollout-max-response-len 6 --num-rollout 2 --lr 0.01 "
        f"--dynamic-sampling-filter-path {hooks}.keep_even_groups "
        f"--rollout-sample-filter-path {hooks}.remove_first_sample "
        f"--rollout-all-samples-process-path {hooks}.count_all_groups "
        f"--custom-rollout-log-function-path {hooks}.log_rollout_myself "
        f"--custom-eval-rollout-log-function-path {hooks}.log_eval_myself "
        f"--custom-convert-samples-to-train-data-path {hooks}.convert_like_slime "
        f"--custom-advantage-function-path {hooks}.constant_advantages "
        f"--rollout-data-postprocess-path {hooks}.double_advantages "
        f"--custom-config-path {cfg} --eval-prompt-data small builtin:arithmetic:test:2:0 --eval-interval 2 "
        f"--output-dir {out} --save-debug-rollout-data {dump}"
    )
    train(parse_args(flags.split()))
    seen = [json.loads(x) for x in open(out / "hooks.jsonl")]
    by_hook = {}
    for entry in seen:
        by_hook.setdefault(entry.pop("hook"), []).append(entry)
    assert by_hook["sample_filter"] == [{"groups": 2}] * 2
    # every group submitted (kept, dropped by the filter, or aborted once the step was full): at least the first
    # over-sampling batch of 4; more when aborted odd groups came back from the buffer and needed another batch
    assert all(e["groups"] >= 4 and e["source"] == "RolloutDataSourceWithBuffer" for e in by_hook["all_samples"])
    assert by_hook["rollout_log"] == [{"rollout_id": r, "samples": 4, "value": 7} for r in (0, 1)]
    assert by_hook["convert"] == [{"samples": 4}] * 2
    assert [e["rollout_id"] for e in by_hook["eval_log"]] == [0, 2]
    steps = [json.loads(x) for x in open(out / "metrics.jsonl") if '"eval/' not in x]
    train_steps = [s for s in steps if "train/loss" in s]
    assert len(train_steps) == 2
    assert not any(k.startswith("rollout/reward") or k.startswith("eval/") for s in steps for k in s)
    # the custom estimator's 0.25, doubled by the post-process hook, on every counted token
    assert all(s["train/advantage_mean"] == pytest.approx(0.5) and s["train/advantage_std"] == 0 for s in train_steps)
    groups = pickle.load(open(str(dump).format(rollout_id=0), "rb"))["samples"]
    assert [[s["remove_sample"] for s in g] for g in groups] == [[True, False]] * 2
