"""slime's fully-async rollout function: generation continues across rollout boundaries and each step takes the
groups that finished first."""

import json
import pickle
from types import SimpleNamespace

import pytest

from slime.config.arguments import parse_args
from slime.rollout.fully_async_rollout import AsyncRolloutWorker
from slime.utils.types import Sample

FLAGS = (
    "--prompt-data builtin:arithmetic:train:64:0 --input-key prompt --custom-rm-path tests.custom_hooks.token_reward "
    "--rollout-function-path slime.rollout.fully_async_rollout.generate_rollout_fully_async "
    "--rollout-batch-size 2 --n-samples-per-prompt 4 --global-batch-size 8 --rollout-max-response-len 8 --lr 0.01 "
    "--sglang-server-concurrency 8"
)


def test_fully_async_rollout_trains_with_a_warm_queue(ray_cluster, tiny_model_path, tmp_path):
    """Three steps: the worker keeps groups generating while the trainer trains, no further ahead than
    --max-staleness allows; aborted groups at each sync go back to the data source, and evaluation runs the default
    rollout."""
    from slime.train import train

    out = tmp_path / "run"
    flags = f"--hf-checkpoint {tiny_model_path} {FLAGS} --num-rollout 3 --output-dir {out} --colocate "
    flags += "--eval-prompt-data small builtin:arithmetic:test:2:0 --eval-interval 3 --max-staleness 1 "
    flags += f"--save {tmp_path / 'ckpt'} --save-debug-rollout-data {tmp_path / 'trained_{rollout_id}.pkl'}"
    train(parse_args(flags.split()))
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [s for s in lines if "train/loss" in s]
    assert [s["train/optimizer_steps"] for s in steps] == [1, 2, 3]
    assert all(s["train/grad_norm"] > 0 for s in steps)
    # --max-staleness 1: once a step has its groups, the worker holds at most one more rollout's worth (2 groups),
    # though the concurrency (8) would let it draw more; so nothing it generates is too old when a step takes it
    assert all(s["rollout/queued_groups"] + s["rollout/generating_groups"] <= 2 for s in steps)
    assert all(s["rollout/weight_version_lag"] >= 0 for s in steps)
    assert all(s["train/staleness_max"] <= 1 and s["rollout/stale_dropped_groups"] == 0 for s in steps)
    assert any("eval/small/reward_mean" in s for s in lines)
    # the checkpoint hands the groups still queued or generating back to the data source, as fresh prompts: every
    # group drawn so far was trained, is in the saved buffer, or was dropped as stale
    with open(tmp_path / "ckpt" / "iter_0000002" / "data_source.pkl", "rb") as f:
        state = pickle.load(f)
    buffered = {g[0]["group_index"] for g in state["buffer"]}
    assert buffered and all(not any(s["tokens"] or s["response"] for s in g) for g in state["buffer"])
    trained = set()
    for k in range(3):
        with open(tmp_path / f"trained_{k}.pkl", "rb") as f:
            trained |= {g[0]["group_index"] for g in pickle.load(f)["samples"]}
    assert not trained & buffered
    assert set(range(state["group_index"])) == trained | buffered


def test_with_in_place_weight_syncs_no_group_is_ever_aborted(ray_cluster, tiny_model_path, tmp_path):
    """--weight-sync-pause-mode in_place (engines and trainer side by side): requests running at a sync go on with
    the new weights, so no group comes back aborted, and the staleness bound still holds."""
    from slime.train import train

    out = tmp_path / "run"
    flags = f"--hf-checkpoint {tiny_model_path} {FLAGS} --num-rollout 4 --output-dir {out} --max-staleness 2 "
    flags += "--weight-sync-pause-mode in_place --rollout-max-response-len 32"
    train(parse_args(flags.split()))
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [s for s in steps if "train/loss" in s]
    assert len(steps) == 4
    assert all(s["rollout/requeued_groups"] == 0 and s["train/staleness_max"] <= 2 for s in steps)
    assert max(s["train/staleness_max"] for s in steps) >= 1  # generation did run ahead of training


def test_a_broken_generate_function_stops_the_fully_async_rollout(ray_cluster, tiny_model_path, tmp_path):
    from slime.train import train

    flags = f"--hf-checkpoint {tiny_model_path} {FLAGS} --num-rollout 1 --output-dir {tmp_path / 'run'} "
    flags += "--custom-generate-function-path tests.custom_hooks.returns_a_number"
    with pytest.raises(Exception, match="fully-async rollout worker stopped: TypeError.*returned int"):
        train(parse_args(flags.split()))


class _Source:
    def __init__(self):
        self.returned = []

    def add_samples(self, groups):
        self.returned += groups


@pytest.mark.parametrize("partial", [False, True])
def test_aborted_groups_go_back_to_the_data_source_and_finished_ones_queue(partial):
    """What the worker does with a group that comes back: aborted (engines paused for a sync or a memory release)
    -> back to the data source (partial responses kept only under --partial-rollout); finished -> the queue."""
    args = SimpleNamespace(dynamic_sampling_filter_path=None, partial_rollout=partial, max_staleness=None)
    source = _Source()
    worker = AsyncRolloutWorker(args, source, concurrency=2)
    done = [Sample(index=0, group_index=0, prompt="p", response_length=3, status=Sample.Status.COMPLETED)]
    cut = [
        Sample(
            index=1,
            group_index=1,
            prompt="q",
            tokens=[1, 2, 3],
            response="ab",
            response_length=2,
            status=Sample.Status.ABORTED,
        )
    ]
    worker._finished(done)
    worker._finished(cut)
    assert worker.get_completed_groups() == [done] and worker.requeued == 1
    (back,) = source.returned
    assert back[0].index == 1 and back[0].response_length == (2 if partial else 0)


def test_the_worker_starts_no_group_that_would_be_trained_too_late():
    """room(): groups may start while the step that trains the newest of them is at most --max-staleness versions
    past the engines' weights."""
    from slime.rollout.staleness import set_engine_version

    args = SimpleNamespace(dynamic_sampling_filter_path=None, max_staleness=2, rollout_batch_size=4)
    worker = AsyncRolloutWorker(args, _Source(), concurrency=64)
    try:
        set_engine_version(None)
        assert worker.room() == 12  # rollouts 0, 1 and 2 on the starting weights
        worker.completed.extend([[Sample(index=i)] for i in range(3)])
        worker.collected = 2
        assert worker.room() == 7
        worker.next_rollout, worker.collected = 3, 0  # rollouts 0-2 taken; the engines still serve version 0
        assert worker.room() == -3
        set_engine_version("1")
        assert worker.room() == 1
    finally:
        set_engine_version(None)
