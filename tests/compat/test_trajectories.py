"""Generate functions that return several samples for one trajectory (slime's multi-agent example): each sample is
trained, groups are normalised over all samples of the prompt, and a trajectory counts once in the loss."""

import json
import pickle
import random

import pytest
import torch

from slime.algorithms.advantages import group_normalize
from slime.algorithms.losses import aggregate
from slime.config.arguments import parse_args
from slime.trainer.packing import trajectory_steps
from slime.utils.types import TrainBatch


def _batch(trajectories: list[int], masks: list[list[int]]) -> TrainBatch:
    n = len(trajectories)
    return TrainBatch(
        tokens=[[1] * (len(m) + 1) for m in masks],
        response_lengths=[len(m) for m in masks],
        loss_masks=masks,
        rewards=[0.0] * n,
        trajectories=trajectories,
    )


def test_trajectory_weighted_loss_matches_a_float64_reference():
    """The loss over a step, however its samples are split into micro-batches, equals the mean over trajectories
    of each trajectory's token mean (all its samples' counted tokens together)."""
    rng = random.Random(0)
    trajectories = [0, 0, 0, 1, 2, 2, 3, 4, 4, 5, 5, 5]
    masks = [[rng.random() < 0.8 for _ in range(rng.randint(1, 7))] for _ in trajectories]
    masks = [[int(x) for x in m] for m in masks]
    values = [[rng.uniform(-2, 2) for _ in m] for m in masks]
    steps, denominators = trajectory_steps(_batch(trajectories, masks), global_batch_size=3)
    assert steps == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    for step in steps:
        ref, seen = 0.0, []
        for t in dict.fromkeys(trajectories[i] for i in step):
            members = [i for i in step if trajectories[i] == t]
            num = sum(v * m for i in members for v, m in zip(values[i], masks[i], strict=True))
            den = sum(sum(masks[i]) for i in members)
            ref += num / max(den, 1)
            seen.append(t)
        ref /= len(seen)
        got = 0.0
        for mb in (step[:2], step[2:5], step[5:]):  # any split into micro-batches adds up to the same
            v = torch.tensor([x for i in mb for x in values[i]], dtype=torch.float64)
            m = torch.tensor([x for i in mb for x in masks[i]], dtype=torch.float64)
            got += float(aggregate(v, m, [len(masks[i]) for i in mb], False, 3.0, [denominators[i] for i in mb]))
        assert got == pytest.approx(ref, abs=1e-12)
    # one sample per trajectory: the plain per-sample mean, no denominators
    assert trajectory_steps(_batch([0, 1, 2, 3], masks[:4]), 2) == ([[0, 1], [2, 3]], None)
    with pytest.raises(ValueError, match="6 trajectories, not a multiple of --global-batch-size 4"):
        trajectory_steps(_batch(trajectories, masks), 4)


def test_groups_of_uneven_sizes_normalise_within_each_group():
    rng = random.Random(1)
    sizes = [5, 3, 1, 4]
    rewards = [rng.choice([0.0, 1.0, 0.5]) for _ in range(sum(sizes))]
    got = group_normalize(torch.tensor(rewards, dtype=torch.float64), sizes, True)
    start = 0
    for size in sizes:
        g = rewards[start : start + size]
        mean = sum(g) / size
        std = (sum((r - mean) ** 2 for r in g) / (size - 1)) ** 0.5 if size > 1 else 0.0
        for k, r in enumerate(g):
            expect = (r - mean) / (std + 1e-6) if size > 1 else r - mean
            assert float(got[start + k]) == pytest.approx(expect, abs=1e-12)
        start += size


def test_a_generate_function_returning_several_samples_trains_each(ray_cluster, tiny_model_path, tmp_path):
    """The multi-agent shape end to end: 2 prompts x 2 samples, each generate call returning 3 samples (two
    solvers, one reviewer): 12 samples trained per rollout in 2 optimizer steps of 2 trajectories each."""
    from slime.train import train

    out, dump = tmp_path / "run", tmp_path / "rollout_{rollout_id}.pkl"
    flags = (
        f"--hf-checkpoint {tiny_model_path} --prompt-data builtin:arithmetic:train:32:0 --input-key prompt "
        "--custom-generate-function-path tests.slime_multi_agent_generate.generate "
        "--custom-rm-path tests.custom_hooks.token_rewards --rollout-batch-size 2 --n-samples-per-prompt 2 "
        "--global-batch-size 2 --rollout-max-response-len 8 --num-rollout 2 --lr 0.01 "
        f"--output-dir {out} --save-debug-rollout-data {dump}"
    )
    train(parse_args(flags.split()))
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [s["train/optimizer_steps"] for s in steps] == [2, 4]
    assert all(s["train/grad_norm"] > 0 and s["train/advantage_abs_max"] > 0 for s in steps)
    groups = pickle.load(open(str(dump).format(rollout_id=0), "rb"))["samples"]
    assert [len(g) for g in groups] == [6, 6]
    for g in groups:
        ids = [s["rollout_id"] for s in g]
        assert len(set(ids)) == 2 and all(ids.count(i) == 3 for i in ids)  # two trajectories of three samples
        assert sorted(s["metadata"]["role"] for s in g).count("reviewer") == 2
        assert all(s["rollout_log_probs"] and len(s["rollout_log_probs"]) == s["response_length"] for s in g)
