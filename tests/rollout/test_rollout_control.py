"""Dynamic sampling, partial rollout and slime-style hooks through the default rollout, on a real engine behind the
real router."""

import copy
import json

import pytest

from slime.utils.http_utils import request_sync
from slime.utils.types import Sample, TokenColumns
from tests.conftest import engines_behind_router, router_flags


@pytest.fixture(scope="module")
def engine_behind_router(tiny_model_path, tmp_path_factory):
    with engines_behind_router(tiny_model_path, tmp_path_factory.mktemp("logs")) as (router, engines):
        yield router, engines[0]


def _aborted_requests(engine) -> int:
    return json.loads(request_sync("GET", engine.url + "/server_info")[1])["internal_states"][0]["aborted_requests"]


def _setup(engine_behind_router, tiny_model_path, tmp_path, *extra):
    from slime.config.arguments import parse_args
    from slime.rollout.data_source import RolloutDataSourceWithBuffer

    router, _ = engine_behind_router
    args = parse_args(
        [
            "--hf-checkpoint",
            tiny_model_path,
            "--prompt-data",
            "builtin:arithmetic:train:200:0",
            "--input-key",
            "prompt",
            "--label-key",
            "label",
            "--apply-chat-template",
            "--rm-type",
            "math",
            "--n-samples-per-prompt",
            "2",
            "--rollout-max-response-len",
            "48",
            "--sglang-server-concurrency",
            "4",
            "--output-dir",
            str(tmp_path / "run"),
            *router_flags(router.url),
            *extra,
        ]
    )
    return args, RolloutDataSourceWithBuffer(args)


def test_filter_rejecting_half_still_fills_the_step_and_aborts_the_rest(
    engine_behind_router, tiny_model_path, tmp_path
):
    from slime.rollout.sglang_rollout import generate_rollout

    _, engine = engine_behind_router
    args, source = _setup(
        engine_behind_router,
        tiny_model_path,
        tmp_path,
        "--rollout-batch-size",
        "4",
        "--over-sampling-batch-size",
        "16",
        "--dynamic-sampling-filter-path",
        "tests.custom_hooks:keep_even_groups",
    )
    before = _aborted_requests(engine)
    out = generate_rollout(args, 0, source)
    assert len(out.samples) == 4 and all(len(g) == 2 for g in out.samples)
    assert all(g[0].group_index % 2 == 0 for g in out.samples)  # only groups the filter kept
    assert [g[0].index for g in out.samples] == sorted(g[0].index for g in out.samples)
    for s in (s for g in out.samples for s in g):
        assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED) and s.reward is not None
    m = out.metrics
    assert m["rollout/kept_groups"] == 4 and m["rollout/submitted_groups"] == 16
    assert m["rollout/dropped_groups"] == m["rollout/dropped/odd_group"] >= 1
    assert m["rollout/aborted_groups"] >= 1
    assert _aborted_requests(engine) > before  # requests in flight when the step filled were aborted on the engine
    # without --partial-rollout, every group not used goes back as a fresh prompt: no prompt is lost
    assert m["rollout/buffer_groups"] == len(source.buffer) == 16 - 4 - m["rollout/dropped_groups"]
    for s in (s for g in source.buffer for s in g):
        assert s.response_length == 0 and not s.tokens and s.status == Sample.Status.PENDING and s.reward is None
    following = generate_rollout(args, 1, source)
    assert following.metrics["rollout/kept_groups"] == 4


def test_partial_rollout_resumes_aborted_samples_with_older_tokens_masked(
    engine_behind_router, tiny_model_path, tmp_path
):
    from slime.rollout.manager import to_train_data
    from slime.rollout.sglang_rollout import generate_rollout

    _, engine = engine_behind_router
    args, source = _setup(
        engine_behind_router,
        tiny_model_path,
        tmp_path,
        "--rollout-batch-size",
        "2",
        "--over-sampling-batch-size",
        "8",
        "--partial-rollout",
        "--mask-offpolicy-in-partial-rollout",
        "--sglang-server-concurrency",
        "16",
        "--custom-generate-function-path",
        "tests.custom_hooks:first_groups_short",
    )
    first = generate_rollout(args, 0, source)
    assert len(first.samples) == 2 and first.metrics["rollout/aborted_groups"] >= 1
    parked = {s.index: copy.deepcopy(s) for g in source.buffer for s in g}
    partial = {i: s for i, s in parked.items() if s.response_length > 0 and s.status == Sample.Status.ABORTED}
    assert partial, "no sample was aborted mid-response"
    for s in parked.values():
        assert s.metadata["start_rollout_id"] == 0 and len(s.rollout_log_probs or []) == s.response_length

    assert request_sync("POST", engine.url + "/update_weight_version", {"new_version": "7"})[0] == 200
    second = generate_rollout(args, 1, source)
    assert second.metrics["rollout/resumed_samples"] >= len(partial)
    now = {s.index: s for g in [*second.samples, *source.buffer] for s in g}
    grew = 0
    for i, old in partial.items():
        s = now[i]
        s.check_alignment()
        n_old = old.response_length
        assert s.tokens[: len(old.tokens)] == old.tokens  # the earlier response continues, nothing re-tokenised
        assert s.rollout_log_probs[:n_old] == old.rollout_log_probs
        assert s.loss_mask[:n_old] == [0] * n_old  # produced by the older weights: masked
        assert s.loss_mask[n_old:] == [1] * (s.response_length - n_old)
        assert s.response_length <= args.rollout_max_response_len  # only the remaining budget was generated
        assert s.metadata["start_rollout_id"] == 0
        if s.response_length > n_old:
            grew += 1
            assert s.weight_versions == ["default", "7"]
    assert grew >= 1
    data = to_train_data(second.samples, args)
    assert [len(m) for m in data.loss_masks] == data.response_lengths


def test_slime_style_custom_generate_runs_unchanged(engine_behind_router, tiny_model_path, tmp_path):
    from slime.rollout.manager import to_train_data
    from slime.rollout.sglang_rollout import generate_rollout

    args, source = _setup(
        engine_behind_router,
        tiny_model_path,
        tmp_path,
        "--rollout-batch-size",
        "3",
        "--custom-generate-function-path",
        "tests.slime_style_generate.generate",
        "--custom-reward-post-process-path",
        "tests.custom_hooks:rank_post_process",
    )
    out = generate_rollout(args, 0, source)
    samples = [s for g in out.samples for s in g]
    assert len(samples) == 6
    for s in samples:
        s.check_alignment()
        assert s.metadata["turns"] == 2 and s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED)
        tool = s.metadata["tool_span"]  # where the tool's tokens went: masked out, log-prob 0
        assert s.loss_mask[tool[0] : tool[1]] == [0] * (tool[1] - tool[0]) and tool[1] > tool[0]
        assert set(s.loss_mask[: tool[0]]) <= {1} and set(s.loss_mask[tool[1] :]) <= {1}
        assert s.rollout_log_probs[tool[0] : tool[1]] == [0.0] * (tool[1] - tool[0])
        assert s.response_length <= args.rollout_max_response_len
    data = to_train_data(out.samples, args, post_process=_load("tests.custom_hooks:rank_post_process"))
    assert data.rewards == [s.reward - 1.0 for s in samples]


def _load(path):
    from slime.utils.misc import load_function

    return load_function(path)


def test_check_reward_nonzero_std_against_a_float64_reference():
    import random
    import statistics
    from types import SimpleNamespace

    from slime.rollout.filter_hub.dynamic_sampling_filters import check_no_aborted_or_failed, check_reward_nonzero_std

    args = SimpleNamespace(reward_key="score")
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        rewards = [rng.choice([0.0, 1.0, 0.5, rng.uniform(-2, 2)]) for _ in range(n)]
        group = [Sample(reward={"score": r}) for r in rewards]
        expected = n > 1 and statistics.stdev(rewards) > 1e-6
        out = check_reward_nonzero_std(args, group)
        assert out.keep == expected and (out.reason is None) == expected
        if not expected:
            assert out.reason == f"zero_std_{round(rewards[0], 1)}"
    group = [Sample(reward=1.0), Sample(reward=0.0, status=Sample.Status.FAILED)]
    assert check_no_aborted_or_failed(args, group).reason == "failed_sample"


def test_reward_post_process_replaces_group_normalisation():
    from types import SimpleNamespace

    import torch

    from slime.algorithms.advantages import compute_advantages

    masks = [torch.ones(3), torch.ones(2), torch.ones(4), torch.ones(1)]
    base = dict(
        advantage_estimator="grpo",
        n_samples_per_prompt=2,
        kl_coef=0.0,
        disable_grpo_std_normalization=False,
        use_opd=False,
        normalize_advantages=False,
    )
    rewards = torch.tensor([3.0, -1.0, 0.5, 0.25], dtype=torch.float64)
    cols = TokenColumns(loss_masks=masks, old_log_probs=masks)
    normalised, _ = compute_advantages(rewards, cols, SimpleNamespace(**base))
    assert [float(a[0]) for a in normalised] == pytest.approx([0.7071, -0.7071, 0.7071, -0.7071], abs=1e-3)
    given, _ = compute_advantages(rewards, cols, SimpleNamespace(**base, custom_reward_post_process_path="m:f"))
    assert [a.tolist() for a in given] == [[3.0] * 3, [-1.0] * 2, [0.5] * 4, [0.25]]


def test_hook_paths_fail_at_parse_time_naming_the_flag(tiny_model_path, capsys):
    from slime.config.arguments import parse_args

    base = ["--hf-checkpoint", tiny_model_path, "--prompt-data", "builtin:arithmetic", "--rm-type", "math"]
    for flag, path, why in [
        ("--dynamic-sampling-filter-path", "tests.custom_hooks:nope", "has no attribute 'nope'"),
        ("--custom-reward-post-process-path", "no_such_module.f", "cannot import module 'no_such_module'"),
        ("--data-source-path", "tests.custom_hooks", "'custom_hooks' in 'tests' is not callable"),
    ]:
        with pytest.raises(SystemExit):
            parse_args([*base, flag, path])
        err = capsys.readouterr().err
        assert f"{flag} {path!r}" in err and why in err, err
    with pytest.raises(SystemExit):
        parse_args([*base, "--mask-offpolicy-in-partial-rollout"])
    assert "needs --partial-rollout" in capsys.readouterr().err


def test_multimodal_inputs_are_refused_by_the_default_generate():
    """The default generate sends token ids only: a sample with images must fail loudly, not lose them."""
    import asyncio
    from types import SimpleNamespace

    from slime.rollout.sglang_rollout import generate_and_rm

    args = SimpleNamespace(
        custom_generate_function_path=None,
        partial_rollout=False,
        sglang_server_concurrency=4,
        rollout_num_engines=1,
        sglang_enable_deterministic_inference=False,
    )
    sample = Sample(index=3, prompt="describe", multimodal_inputs={"images": ["x.png"]})
    with pytest.raises(ValueError, match="sample 3 carries multimodal_inputs \\(\\['images'\\]\\)"):
        asyncio.run(generate_and_rm(args, sample, {"max_new_tokens": 4}))


def test_an_agent_in_the_shape_of_slimes_examples(engine_behind_router, tiny_model_path, tmp_path):
    """GenerateState, Sample.append_response_tokens and math_dapo_utils at slime's import paths, through the default
    rollout on a real engine: observation tokens are masked with log-prob 0, model tokens carry the engine's."""
    from slime.rollout.sglang_rollout import GenerateState, generate_rollout

    args, source = _setup(
        engine_behind_router,
        tiny_model_path,
        tmp_path,
        "--rollout-batch-size",
        "2",
        "--custom-generate-function-path",
        "tests.slime_agent_generate:generate",
        "--custom-rm-path",
        "tests.slime_agent_generate:reward",
    )
    out = generate_rollout(args, 0, source)
    samples = [s for g in out.samples for s in g]
    assert len(samples) == 4
    for s in samples:
        s.check_alignment()
        a, b = s.metadata["observation_span"]
        assert b > a and s.loss_mask[a:b] == [0] * (b - a) and s.rollout_log_probs[a:b] == [0.0] * (b - a)
        assert set(s.loss_mask[:a]) == {1} and s.reward in (1.0, -1.0) and s.weight_versions
        assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED)
    state = GenerateState(args)
    assert state is GenerateState(args) and state.sampling_params["max_new_tokens"] == args.rollout_max_response_len


def test_a_generate_function_failing_on_every_sample_stops_the_rollout_with_its_error(
    engine_behind_router, tiny_model_path, tmp_path
):
    from slime.rollout.sglang_rollout import generate_rollout

    args, source = _setup(
        engine_behind_router,
        tiny_model_path,
        tmp_path,
        "--custom-generate-function-path",
        "tests.custom_hooks:exploding_generate",
    )
    with pytest.raises(RuntimeError, match="all 16 generations failed.*the agent's tool server is down"):
        generate_rollout(args, 0, source)


def test_slime_style_data_sources_save_and_load_themselves(tmp_path):
    from slime.rollout.manager import load_data_source, save_data_source
    from tests.custom_hooks import SlimeStyleDataSource

    source = SlimeStyleDataSource(None, tmp_path)
    source.position = 17
    save_data_source(source, tmp_path, 4)
    fresh = SlimeStyleDataSource(None, tmp_path)
    load_data_source(fresh, tmp_path, 4)
    assert fresh.position == 17


def test_keep_when_insufficient_keeps_rejected_groups_instead_of_sampling_more(
    engine_behind_router, tiny_model_path, tmp_path
):
    """As in slime: with exactly --rollout-batch-size prompts out, every group is needed, so groups the filter
    rejects with keep_when_insufficient stay in the step and no further prompt is sampled."""
    from slime.rollout.sglang_rollout import generate_rollout

    args, source = _setup(
        engine_behind_router,
        tiny_model_path,
        tmp_path,
        "--rollout-batch-size",
        "4",
        "--dynamic-sampling-filter-path",
        "tests.custom_hooks:keep_even_groups_with_fallback",
    )
    out = generate_rollout(args, 0, source)
    m = out.metrics
    assert m["rollout/kept_groups"] == 4 and m["rollout/submitted_groups"] == 4 and m["rollout/dropped_groups"] == 0
    assert sorted(g[0].group_index % 2 for g in out.samples) == [0, 0, 1, 1]
    # the tail: the last kept group came no earlier than the average one
    assert (
        0 < m["rollout/group_seconds_mean"] <= m["rollout/group_seconds_last"]
        and m["rollout/group_seconds_last_over_mean"] >= 1
    )


def testfilter_verdict_keeps_an_insufficient_rejection_only_while_needed():
    from types import SimpleNamespace

    from slime.rollout.filter_hub.base_types import DynamicFilterOutput
    from slime.rollout.sglang_rollout import filter_verdict

    def reject(args, group):
        return DynamicFilterOutput(keep=False, reason="zero_std_0.0", keep_when_insufficient=True)

    args = SimpleNamespace(dynamic_sampling_filter_path="f")
    assert filter_verdict(reject, args, [Sample()], alive=4, target=4) == (True, None)
    assert filter_verdict(reject, args, [Sample()], alive=5, target=4) == (False, "zero_std_0.0")
