"""The real sglang-router in front of two real engine servers, and the Ray rollout pipeline end to end."""

import asyncio
import json
import socket

import pytest

from slime.router.router import launch_router, list_workers
from slime.utils.http_utils import post, release_port, request_sync, reserve_port
from tests.conftest import engines_behind_router, router_flags


@pytest.fixture(scope="module")
def two_engines_behind_router(tiny_model_path, tmp_path_factory):
    with engines_behind_router(tiny_model_path, tmp_path_factory.mktemp("logs"), count=2) as pair:
        yield pair


def test_a_reserved_port_is_kept_from_others_but_open_to_its_router(tmp_path):
    """The router's port is chosen before Ray starts (every process reads it from the flags) and the router binds
    it seconds later: meanwhile no bind to port 0 and no plain bind gets it, and the real router still can."""
    port = reserve_port()
    try:
        taken = set()
        for _ in range(2000):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                taken.add(s.getsockname()[1])
        assert port not in taken
        with socket.socket() as s, pytest.raises(OSError, match="in use"):
            s.bind(("127.0.0.1", port))
        router = launch_router(tmp_path, port=port)
        try:
            assert router.url.endswith(f":{port}") and list_workers(router.url) == []
        finally:
            router.stop()
    finally:
        release_port("127.0.0.1", port)


def test_router_lists_both_engines_and_spreads_load(two_engines_behind_router):
    router, engines = two_engines_behind_router
    assert sorted(w["url"] for w in list_workers(router.url)) == sorted(e.url for e in engines)

    async def many():
        params = {"max_new_tokens": 16, "ignore_eos": True}
        reqs = [
            post(
                router.url + "/generate",
                {"input_ids": [1, 100 + i, 200 + 3 * i, 7], "sampling_params": params, "return_logprob": True},
            )
            for i in range(32)
        ]
        return await asyncio.gather(*reqs)

    outs = asyncio.run(many())
    assert all(len(o["meta_info"]["output_token_logprobs"]) == 16 for o in outs)  # answers pass through unchanged
    served = [
        json.loads(request_sync("GET", e.url + "/server_info")[1])["internal_states"][0]["finished_requests"]
        for e in engines
    ]
    assert sum(served) >= 32 and min(served) > 0, served


def _args(tiny_model_path, tmp_path, *extra):
    from slime.config.arguments import parse_args

    return parse_args(
        [
            "--hf-checkpoint",
            tiny_model_path,
            "--prompt-data",
            "builtin:arithmetic:train:50:0",
            "--input-key",
            "prompt",
            "--label-key",
            "label",
            "--apply-chat-template",
            "--rm-type",
            "math",
            "--rollout-batch-size",
            "4",
            "--n-samples-per-prompt",
            "3",
            "--rollout-max-response-len",
            "12",
            "--rollout-num-engines",
            "2",
            "--output-dir",
            str(tmp_path / "run"),
            *extra,
        ]
    )


def test_rollout_pipeline_through_ray(ray_cluster, tiny_model_path, tmp_path):
    import ray

    from slime.rollout.manager import RolloutManager
    from slime.utils.types import Sample

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        "eval:\n  datasets:\n    - {name: short, path: 'builtin:arithmetic:test:9:1', max_prompts: 3,\n"
        "       n_samples_per_eval_prompt: 2, max_response_len: 4}\n"
    )
    args = _args(
        tiny_model_path,
        tmp_path,
        "--custom-rm-path",
        "tests.custom_hooks:length_reward",
        "--eval-config",
        str(cfg),
        "--eval-prompt-data",
        "held_out",
        "builtin:arithmetic:test:5:0",
    )
    manager = RolloutManager.options(num_cpus=0).remote(args)
    try:
        out = ray.get(manager.generate.remote(0))
        groups = out["samples"]
        assert len(groups) == 4 and all(len(g) == 3 for g in groups)
        for g in groups:
            assert len({s.prompt for s in g}) == 1 and len({s.group_index for s in g}) == 1
            for s in g:
                s.check_alignment()
                assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED)
                assert 0 < s.response_length <= 12 and len(s.rollout_log_probs) == s.response_length
                assert s.reward == float(s.response_length)  # the custom reward ran on this very sample
                assert s.weight_versions == ["default"]
        m = out["metrics"]
        assert (
            m["rollout/tokens"] == sum(s.response_length for g in groups for s in g) and m["rollout/tokens_per_s"] > 0
        )
        ev = ray.get(manager.eval.remote(0))["metrics"]
        assert ev["eval/held_out/reward_mean"] > 0 and ev["eval/held_out/num_prompts"] == 5
        assert "eval/held_out/pass@1" in ev and "eval/held_out/pass@2" not in ev
        # the YAML dataset: its own sample count and length cap; length_reward >= 1 makes every sample "correct"
        assert ev["eval/short/num_prompts"] == 3 and ev["eval/short/pass@2"] == 1.0
        assert 0 < ev["eval/short/response_len_mean"] <= 4 < ev["eval/held_out/response_len_mean"]
    finally:
        ray.get(manager.shutdown.remote())


def test_train_debug_rollout_only_logs_metrics(tiny_model_path, tmp_path):
    from slime.train import train

    args = _args(tiny_model_path, tmp_path, "--num-rollout", "2", "--debug-rollout-only", "--rollout-num-engines", "1")
    result = train(args)
    assert 0.0 <= result["rollout"]["rollout/reward_mean"] <= 1.0
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [0, 1] and all(x["rollout/tokens_per_s"] > 0 for x in lines)
    for x in lines:  # the engine's own counters for each rollout: every token it generated is a response token
        assert x["engine/generated_tokens"] == x["rollout/tokens"] and x["engine/decode_steps"] > 0
        assert x["engine/prefill_tokens"] + x["engine/prefix_shared_tokens"] > 0
        # the engine's seconds fit inside the rollout's: time around the engine is told from time in it
        assert x["engine/prefill_passes"] >= 1 and x["engine/prefill_seconds"] > 0 and x["engine/decode_seconds"] > 0
        assert x["engine/prefill_seconds"] + x["engine/decode_seconds"] < x["perf/rollout_seconds"]
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_generate_rollout_group_rm_and_a_step_of_failed_rewards(two_engines_behind_router, tiny_model_path, tmp_path):
    """--group-rm through the default rollout on real engines: the custom function sees each full group once; a step
    whose every reward failed stops the run with the first error instead of training on --reward-on-error."""
    from slime.rollout.data_source import RolloutDataSourceWithBuffer
    from slime.rollout.sglang_rollout import generate_rollout

    router, _ = two_engines_behind_router

    def rollout(*extra):
        args = _args(tiny_model_path, tmp_path, *router_flags(router.url), *extra)
        source = RolloutDataSourceWithBuffer(args)
        return generate_rollout(args, 0, source)

    out = rollout("--group-rm", "--custom-rm-path", "tests.custom_hooks:group_rank_reward")
    for group in out.samples:
        longest = max(len(s.response) for s in group)
        assert [s.reward for s in group] == [float(len(s.response) == longest) for s in group]
    assert out.metrics["rollout/reward_errors"] == 0
    with pytest.raises(RuntimeError, match="all 12 rewards failed.*grader exploded"):
        rollout("--custom-rm-path", "tests.custom_hooks:failing_reward")
