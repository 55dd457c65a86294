"""The reward boundary as the rollout sees it: return convention, remote_rm over loopback HTTP, --group-rm,
--eval-reward-key, and a step whose every reward failed."""

import asyncio
from types import SimpleNamespace

import pytest
from aiohttp import web

from slime.rollout.rm_hub import batched_async_rm
from slime.rollout.scoring import check_reward, score_group, score_sample
from slime.rollout.sglang_rollout import rollout_metrics
from slime.utils.http_utils import close_sessions
from slime.utils.types import Sample


def args(**kw):
    base = dict(
        rm_type="math",
        custom_rm_path=None,
        reward_on_error=0.0,
        rm_timeout=5.0,
        reward_key=None,
        eval_reward_key=None,
        group_rm=False,
        rm_url=None,
        rm_max_retries=3,
    )
    return SimpleNamespace(**{**base, **kw})


def test_return_convention_is_checked_and_names_the_function():
    assert check_reward(1, None, "f") == 1.0 and check_reward(True, None, "f") == 1.0
    assert check_reward({"score": 2, "acc": 1}, "score", "f") == {"score": 2, "acc": 1}
    with pytest.raises(TypeError, match="my.mod:fn returned NoneType"):
        check_reward(None, None, "my.mod:fn")
    with pytest.raises(TypeError, match=r"keys \['acc', 'score'\]; choose the scalar with --reward-key"):
        check_reward({"score": 1, "acc": 1}, None, "f")
    with pytest.raises(KeyError, match="without the reward key 'pred'"):
        check_reward({"score": 1}, "pred", "f")
    with pytest.raises(TypeError, match=r"\['score'\] returned str"):
        check_reward({"score": "high"}, "score", "f")
    with pytest.raises(ValueError, match="returned nan"):
        check_reward(float("nan"), None, "f")


def test_bad_return_marks_the_sample_and_names_the_hook():
    s = Sample(response="x", label="1", index=5)
    asyncio.run(score_sample(args(custom_rm_path="tests.custom_hooks:none_reward", reward_on_error=-1.0), s))
    assert s.reward == -1.0
    assert s.metadata["reward_error"].startswith("--custom-rm-path tests.custom_hooks:none_reward: TypeError")


def test_eval_reward_key_picks_another_scalar_for_evaluation():
    a = args(custom_rm_path="tests.custom_hooks:dict_reward", reward_key="score", eval_reward_key="acc")
    train, ev = Sample(response="42", label="42"), Sample(response="42", label="42")
    asyncio.run(score_sample(a, train))
    asyncio.run(score_sample(a, ev, evaluation=True))
    assert "reward_error" not in train.metadata and "reward_error" not in ev.metadata
    assert train.get_reward_value(a) == 2.0
    assert rollout_metrics([[train]], 1.0, key="score")["rollout/reward_mean"] == 2.0
    assert rollout_metrics([[ev]], 1.0, prefix="eval/x", key="acc")["eval/x/reward_mean"] == 1.0


def test_group_rm_calls_the_custom_function_once_per_group():
    group = [Sample(response=r, index=i) for i, r in enumerate(["a", "abc", "ab"])]
    a = args(custom_rm_path="tests.custom_hooks:group_rank_reward", group_rm=True)
    asyncio.run(score_group(a, group))
    assert [s.reward for s in group] == [0.0, 1.0, 0.0]
    assert asyncio.run(batched_async_rm(a, group)) == [0.0, 1.0, 0.0]
    # a per-sample function given a group fails; the message says it got a list
    bad = args(custom_rm_path="tests.custom_hooks:length_reward", group_rm=True, reward_on_error=-1.0)
    asyncio.run(score_group(bad, group))
    assert all(s.reward == -1.0 and "called with a list of samples" in s.metadata["reward_error"] for s in group)
    # one reward for the whole group instead of one per sample is refused, not broadcast
    scalar = args(custom_rm_path="tests.custom_hooks:group_size_reward", group_rm=True)
    asyncio.run(score_group(scalar, group))
    assert all(
        "returned float; with --group-rm it must return one reward per" in s.metadata["reward_error"] for s in group
    )


def test_batched_async_rm_without_custom_function_grades_each_sample():
    samples = [Sample(response="\\boxed{3}", label="3"), Sample(response="\\boxed{4}", label="3")]
    assert asyncio.run(batched_async_rm(args(), samples)) == [1.0, 0.0]


async def _serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/score", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/score"


def test_remote_rm_posts_prompt_response_label_and_retries_5xx():
    seen, calls = [], {"n": 0}

    async def handler(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return web.Response(status=503, text="warming up")
        body = await request.json()
        seen.append(body)
        return web.json_response({"score": float(body["response"] == body["label"]), "judge": "exact"})

    async def main():
        runner, url = await _serve(handler)
        try:
            a = args(rm_type="remote_rm", rm_url=url, reward_key="score")
            s = Sample(prompt="2+2?", response="4", label="4", index=0)
            await score_sample(a, s)
            return s
        finally:
            await close_sessions()
            await runner.cleanup()

    s = asyncio.run(main())
    assert seen == [{"prompt": "2+2?", "response": "4", "label": "4"}] and calls["n"] == 2
    assert s.reward == {"score": 1.0, "judge": "exact"} and "reward_error" not in s.metadata


@pytest.mark.parametrize(
    "status, body, expect",
    [
        (400, "bad request: no label", "HTTP 400: bad request: no label"),
        (200, "not a number", "answered 'not a number', not a number or JSON"),
    ],
)
def test_remote_rm_errors_are_clear(status, body, expect):
    async def handler(request):
        return web.Response(status=status, text=body)

    async def main():
        runner, url = await _serve(handler)
        try:
            s = Sample(prompt="p", response="r", label="l", index=9)
            await score_sample(args(rm_type="remote_rm", rm_url=url), s)
            return s, url
        finally:
            await close_sessions()
            await runner.cleanup()

    s, url = asyncio.run(main())
    assert s.reward == 0.0 and expect in s.metadata["reward_error"]


def test_remote_rm_down_fails_after_its_retries_not_forever():
    from slime.utils.http_utils import free_port

    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    s = Sample(prompt="p", response="r", label="l", index=1)

    async def main():
        try:
            await score_sample(args(rm_type="remote_rm", rm_url=url, rm_max_retries=2), s)
        finally:
            await close_sessions()

    asyncio.run(main())
    assert "ConnectionError" in s.metadata["reward_error"] and "after 3 attempts" in s.metadata["reward_error"]
    assert url in s.metadata["reward_error"]
