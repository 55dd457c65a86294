"""The trainer through Ray on the tiny model: step-0 logprob agreement per sync mode, world size 1 == 2."""

import glob
import json
import math
import random

import pytest
import torch

from slime.config.arguments import parse_args
from slime.engine.launch import launch_engine
from slime.ray.train_group import TrainGroup
from slime.utils.http_utils import request_sync
from slime.utils.types import TrainBatch

TEMPERATURE = 0.8


def _args(model, tmp_path, *extra):
    return parse_args(
        [
            "--hf-checkpoint",
            model,
            "--prompt-data",
            "builtin:arithmetic",
            "--rm-type",
            "math",
            "--rollout-temperature",
            str(TEMPERATURE),
            "--output-dir",
            str(tmp_path),
            "--seed",
            "3",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def engine(tiny_model_path, tmp_path_factory):
    server = launch_engine(tiny_model_path, tmp_path_factory.mktemp("logs"), num_threads=1)
    yield server
    server.stop()


def _generate(url: str, n: int, seed: int) -> tuple[TrainBatch, str]:
    """Sample n responses from the engine; returns the trainer's batch with the engine's log-probs, and the
    engine's weight version."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(4, 9))] for _ in range(n)]
    body = {
        "input_ids": prompts,
        "return_logprob": True,
        "sampling_params": {"temperature": TEMPERATURE, "max_new_tokens": 10, "ignore_eos": True},
    }
    status, text = request_sync("POST", f"{url}/generate", body, timeout=120)
    assert status == 200, text
    outs = json.loads(text)
    data = {"tokens": [], "response_lengths": [], "loss_masks": [], "rewards": [], "rollout_log_probs": []}
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        ids = [t for _, t, *_ in o["meta_info"]["output_token_logprobs"]]
        data["tokens"].append(p + ids)
        data["response_lengths"].append(len(ids))
        data["loss_masks"].append([1] * len(ids))
        data["rewards"].append(float(i % 2))
        data["rollout_log_probs"].append([lp for lp, *_ in o["meta_info"]["output_token_logprobs"]])
    return TrainBatch(**data), outs[0]["meta_info"]["weight_version"]


def _max_diff(data: TrainBatch, log_probs: list[list[float]]) -> float:
    return max(
        abs(a - b)
        for got, want in zip(log_probs, data.rollout_log_probs, strict=True)
        for a, b in zip(got, want, strict=True)
    )


@pytest.mark.parametrize("mode", ["tensor", "distributed", "disk"])
def test_engine_logprobs_equal_trainer_logprobs_after_sync(mode, ray_cluster, engine, tiny_model_path, tmp_path):
    args = _args(
        tiny_model_path,
        tmp_path,
        "--update-weight-mode",
        mode,
        "--lr",
        "0.05",
        "--rollout-batch-size",
        "4",
        "--n-samples-per-prompt",
        "2",
        "--update-weight-buffer-size",
        str(200_000),
    )  # several buckets
    group = TrainGroup(args)
    try:
        group.call("connect_engines", [engine.url])
        metrics = group.train(0, _generate(engine.url, 8, seed=1)[0])
        assert metrics["train/grad_norm"] > 0
        stale, _ = _generate(engine.url, 8, seed=2)
        assert _max_diff(stale, group.call("log_probs", stale)[0]) > 1e-2  # trained weights not yet on the engine
        sync = group.update_weights(f"{mode}-1")
        assert sync["sync/tensors"] > 0 and sync["sync/bytes"] > 0
        assert 0 < sync["sync/gather_seconds"] + sync["sync/send_seconds"] <= sync["sync/seconds"]
        fresh, version = _generate(engine.url, 8, seed=2)
        assert version == f"{mode}-1"
        assert _max_diff(fresh, group.call("log_probs", fresh)[0]) < 1e-4  # fp32, same tokens, same temperature
    finally:
        group.shutdown()


def _synthetic_batch(n: int, seed: int = 0, rollout_log_probs: bool = False) -> TrainBatch:
    rng = random.Random(seed)
    data = {"tokens": [], "response_lengths": [], "loss_masks": [], "rewards": [], "rollout_log_probs": []}
    for _ in range(n):
        prompt_len, resp_len = rng.randint(3, 12), rng.randint(1, 14)
        data["tokens"].append([rng.randrange(100, 40000) for _ in range(prompt_len + resp_len)])
        data["response_lengths"].append(resp_len)
        data["loss_masks"].append([int(rng.random() > 0.2) for _ in range(resp_len)])
        data["rewards"].append(float(rng.random() > 0.5))
        data["rollout_log_probs"].append([rng.gauss(-10, 1) for _ in range(resp_len)] if rollout_log_probs else [])
    return TrainBatch(**data)


ALGORITHMS = {
    "grpo, KL loss": ["--use-kl-loss", "--kl-loss-coef", "0.1", "--entropy-coef", "0.01"],
    "grpo, slime-signature TIS hook": [
        "--custom-tis-function-path",
        "tests.custom_hooks:slime_signature_tis",
        "--use-kl-loss",
        "--kl-loss-coef",
        "0.1",
    ],
    "grpo, KL loss, per token": ["--use-kl-loss", "--kl-loss-coef", "0.1", "--calculate-per-token-loss"],
    "ppo, KL reward, TIS + MIS": [
        "--advantage-estimator",
        "ppo",
        "--kl-coef",
        "0.1",
        "--normalize-advantages",
        "--use-tis",
        "--tis-clip-low",
        "0.5",
        "--use-mis",
        "--mis-level",
        "geometric",
        "--mis-upper-bound",
        "1e6",
        "--mis-lower-bound",
        "1e-6",
        "--critic-lr",
        "0.02",
    ],
}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_world_size_two_matches_world_size_one(algorithm, ray_cluster, tiny_model_path, tmp_path):
    """The same rollout on one rank (micro-batches of 2) and on two ranks (token-packed, token-balanced, larger
    no-grad passes): equal metrics and equal weights after two optimizer steps, with every per-token input gathered
    across ranks (ppo: the critic too)."""
    data = _synthetic_batch(16, rollout_log_probs="TIS" in algorithm)
    common = [
        "--rollout-batch-size",
        "4",
        "--n-samples-per-prompt",
        "4",
        "--global-batch-size",
        "8",
        "--lr",
        "0.01",
        "--train-threads",
        "1",
        *ALGORITHMS[algorithm],
    ]
    runs = {}
    for name, extra in {
        "ws1 micro-batch 2": ["--micro-batch-size", "2"],
        "ws2 packed <= 40 tokens, balanced": [
            "--actor-num-gpus-per-node",
            "2",
            "--use-dynamic-batch-size",
            "--max-tokens-per-gpu",
            "40",
            "--balance-data",
            "--log-probs-max-tokens-per-gpu",
            "64",
        ],
    }.items():
        group = TrainGroup(_args(tiny_model_path, tmp_path, *common, *extra))
        try:
            metrics = group.train(0, data)
            runs[name] = metrics, torch.tensor([x for lp in group.call("log_probs", data)[0] for x in lp])
        finally:
            group.shutdown()
    (m1, lp1), (m2, lp2) = runs.values()
    assert m1["train/optimizer_steps"] == m2["train/optimizer_steps"] == 2
    assert m1.keys() == m2.keys()
    for key in m1:
        if key.startswith(("train/", "critic/")) and key not in ("train/seconds", "train/tokens_per_s"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    assert m1["train/pg_loss"] != 0 and m1["train/kl_loss"] != 0  # step 2 is off-policy: real terms
    if "ppo" in algorithm:
        assert m1["critic/value_loss"] > 0 and m1["critic/grad_norm"] > 0 and m1["train/mismatch_k3_kl"] > 0
    assert torch.allclose(lp1, lp2, atol=1e-5)  # the same weights after two optimizer steps


def test_rl_loop_trains_and_engines_serve_new_weights(ray_cluster, tiny_model_path, tmp_path):
    """slime.train.train end to end on the tiny model: rollout -> train -> sync, through Ray, three times. With
    --colocate the engine frees its weights after each rollout and takes them back only for the sync (on CPU the
    trainer's offload is a no-op), so the engine's log-probs matching the trainer's proves the sync refilled them."""
    from slime.train import train

    out = tmp_path / "run"
    args = parse_args(
        [
            "--hf-checkpoint",
            tiny_model_path,
            "--prompt-data",
            "builtin:arithmetic:train:64:0",
            "--input-key",
            "prompt",
            "--custom-rm-path",
            "tests.custom_hooks.token_reward",
            "--rollout-batch-size",
            "4",
            "--n-samples-per-prompt",
            "4",
            "--global-batch-size",
            "8",
            "--rollout-max-response-len",
            "12",
            "--num-rollout",
            "3",
            "--lr",
            "0.01",
            "--output-dir",
            str(out),
            "--colocate",
            "--use-dynamic-batch-size",  # no --max-tokens-per-gpu: the rank sizes its budget (CPU: a fixed one)
        ]
    )
    segments = set(glob.glob("/dev/shm/torch_*"))
    train(args)
    # the weight-sync buffers (shared memory: RAM) are gone with the run
    assert set(glob.glob("/dev/shm/torch_*")) <= segments
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert all(s["perf/token_budget"] == 2048 for s in steps)
    assert all("perf/engine_release_seconds" in s and "perf/engine_resume_weights_seconds" in s for s in steps)
    # the engine generated rollout k with the weights of sync k (version "0" is the initial checkpoint)
    assert [s["rollout/weight_version"] for s in steps] == [0, 1, 2]
    assert all(s["train/optimizer_steps"] == 2 * (k + 1) for k, s in enumerate(steps))
    norms = [s["train/param_norm"] for s in steps]
    assert len(set(norms)) == 3  # every rollout's steps moved the weights
    assert len({round(s["train/loss"], 8) for s in steps}) == 3 and any(s["train/loss"] != 0 for s in steps)
    assert all(s["train/grad_norm"] > 0 and s["sync/tensors"] > 0 for s in steps)
    # step-0 agreement inside the loop: the trainer's recomputed old log-probs match the engine's
    assert all(s["train/logprob_abs_diff_vs_rollout"] < 1e-4 for s in steps)


ESTIMATOR_RUNS = {
    "gspo": ["--advantage-estimator", "gspo", "--eps-clip", "3e-3", "--eps-clip-high", "4e-3", "--offload-train"],
    "reinforce_plus_plus, async": [
        "--advantage-estimator",
        "reinforce_plus_plus",
        "--kl-coef",
        "0.01",
        "--gamma",
        "0.99",
        "--async",
        "--rollout-num-engines",
        "2",
    ],
    "reinforce_plus_plus_baseline, custom loss": [
        "--advantage-estimator",
        "reinforce_plus_plus_baseline",
        "--loss-type",
        "custom_loss",
        "--custom-loss-function-path",
        "tests.custom_hooks.reinforce_loss",
    ],
    "ppo": ["--advantage-estimator", "ppo", "--lambd", "0.95", "--critic-lr", "0.01", "--use-tis"],
    "on_policy_distillation": ["--advantage-estimator", "on_policy_distillation"],
    "grpo + opd, Dr. GRPO reducer": [
        "--use-opd",
        "--opd-kl-coef",
        "0.5",
        "--custom-pg-loss-reducer-function-path",
        "slime.algorithms.losses:dr_grpo_pg_loss_reducer",
        "--disable-grpo-std-normalization",
    ],
}


@pytest.mark.parametrize("name", list(ESTIMATOR_RUNS))
def test_every_estimator_runs_the_loop(name, ray_cluster, tiny_model_path, tiny_teacher_path, tmp_path):
    """Each estimator through slime.train.train on the tiny model: two rollouts, two optimizer steps each."""
    from slime.train import train

    out = tmp_path / "run"
    extra = list(ESTIMATOR_RUNS[name])
    if "opd" in name or "distillation" in name:
        extra += ["--opd-teacher-load", tiny_teacher_path]
    args = parse_args(
        [
            "--hf-checkpoint",
            tiny_model_path,
            "--prompt-data",
            "builtin:arithmetic:train:64:0",
            "--input-key",
            "prompt",
            "--custom-rm-path",
            "tests.custom_hooks.token_reward",
            "--rollout-batch-size",
            "4",
            "--n-samples-per-prompt",
            "4",
            "--global-batch-size",
            "8",
            "--rollout-max-response-len",
            "10",
            "--num-rollout",
            "2",
            "--lr",
            "0.01",
            "--output-dir",
            str(out),
            *extra,
        ]
    )
    train(args)
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [s["train/optimizer_steps"] for s in steps] == [2, 4]
    assert steps[0]["train/param_norm"] != steps[1]["train/param_norm"]
    assert all(math.isfinite(s["train/loss"]) and s["train/grad_norm"] > 0 for s in steps)
    assert all(s["train/advantage_abs_max"] > 0 for s in steps)
    assert [s["train/staleness_max"] for s in steps] == ([0, 1] if "async" in name else [0, 0])
    if name == "ppo":
        assert all(s["critic/value_loss"] > 0 and s["critic/grad_norm"] > 0 for s in steps)
    if name.startswith("reinforce"):  # whitened over the batch
        assert all(abs(s["train/advantage_mean"]) < 1e-4 for s in steps)
    if "custom loss" in name:  # the hook's metrics, averaged like the loss (all-ones -> exactly 1)
        assert all(s["train/custom_pg_loss"] == s["train/loss"] for s in steps)
        assert all(s["train/logits_rows"] == pytest.approx(1.0) for s in steps)


def test_weights_sync_every_n_rollouts_from_a_start_id(ray_cluster, tiny_model_path, tmp_path):
    """--start-rollout-id 1 --update-weights-interval 2 over --num-rollout 5: rollouts 1-4 run, the weights reach
    the engine after rollouts 1 and 3 and after the last, and each rollout records the version it was generated
    with. The trainer recomputes activations (slime's recompute flags), which must not rename the weights it
    syncs."""
    from slime.train import train

    out = tmp_path / "run"
    flags = (
        f"--hf-checkpoint {tiny_model_path} --prompt-data builtin:arithmetic:train:64:0 --input-key prompt "
        "--custom-rm-path tests.custom_hooks.token_reward --rollout-batch-size 2 --n-samples-per-prompt 4 "
        f"--rollout-max-response-len 8 --num-rollout 5 --lr 0.01 --output-dir {out} "
        "--start-rollout-id 1 --update-weights-interval 2 "
        "--rollout-function-path tests.custom_hooks:groups_only_rollout "
        "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"  # names survive the sync
    )
    train(parse_args(flags.split()))
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [s["rollout/weight_version"] for s in steps] == [0, 2, 2, 4]
    assert ["sync/seconds" in s for s in steps] == [True, False, True, True]
    # the rollout function returned groups alone: the standard rollout metrics are still there
    assert all("rollout/reward_mean" in s and s["rollout/tokens"] > 0 for s in steps)


def test_tensor_parallel_two_matches_one_rank(ray_cluster, tiny_model_path, tmp_path):
    """--tensor-model-parallel-size 2 on two ranks (the model split by its transformers tp plan, FSDP2 over the one
    data-parallel rank) against one plain rank: equal metrics (gradient clipping active, KL to a tensor-parallel
    reference) and equal weights after two optimizer steps; a checkpoint written by the two ranks loads on one."""
    data = _synthetic_batch(16)
    common = ["--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--global-batch-size", "8", "--lr", "0.01"]
    common += ["--train-threads", "1", "--use-kl-loss", "--kl-loss-coef", "0.1", "--clip-grad", "0.5"]
    runs = {}
    for name, extra in {
        "ws1": [],
        "tp2": ["--actor-num-gpus-per-node", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
    }.items():
        group = TrainGroup(_args(tiny_model_path, tmp_path / name, *common, *extra))
        try:
            metrics = group.train(0, data)
            runs[name] = metrics, torch.tensor([x for lp in group.call("log_probs", data)[0] for x in lp])
            if name == "tp2":
                group.call("save", str(tmp_path / "ckpt"))
        finally:
            group.shutdown()
    (m1, lp1), (m2, lp2) = runs.values()
    assert m1["train/grad_norm"] > 0.5  # clipping is active
    for key in m1:
        if key.startswith("train/") and key not in ("train/seconds", "train/tokens_per_s"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    assert torch.allclose(lp1, lp2, atol=1e-5)
    group = TrainGroup(_args(tiny_model_path, tmp_path / "reload", *common))
    try:
        group.call("load", str(tmp_path / "ckpt"))
        reloaded = torch.tensor([x for lp in group.call("log_probs", data)[0] for x in lp])
    finally:
        group.shutdown()
    assert torch.allclose(reloaded, lp2, atol=1e-5)
