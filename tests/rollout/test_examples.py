"""The two agent examples, through the default rollout on a real SmolLM2 engine behind the real router: the tools
are really called, their turns are loss-masked, and the samples are ready to train on."""

import pytest

from tests.conftest import engines_behind_router, router_flags


@pytest.fixture(scope="module")
def smollm2_behind_router(smollm2_path, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with engines_behind_router(smollm2_path, logs, num_threads=2, ready_s=300) as (router, _):
        yield router


def _rollout(router, smollm2_path, tmp_path, prompt_data, agent, max_len):
    from slime.config.arguments import parse_args
    from slime.rollout.data_source import RolloutDataSourceWithBuffer
    from slime.rollout.manager import to_train_data
    from slime.rollout.sglang_rollout import generate_rollout

    args = parse_args(
        [
            "--hf-checkpoint",
            smollm2_path,
            "--prompt-data",
            prompt_data,
            "--input-key",
            "prompt",
            "--label-key",
            "label",
            "--rollout-batch-size",
            "3",
            "--n-samples-per-prompt",
            "3",
            "--rollout-max-response-len",
            str(max_len),
            "--rollout-temperature",
            "0.7",
            "--custom-generate-function-path",
            f"{agent}:generate",
            "--custom-rm-path",
            f"{agent}:reward",
            "--output-dir",
            str(tmp_path / "run"),
            "--sglang-enable-deterministic-inference",  # seeded: not flaky
            *router_flags(router.url),
        ]
    )
    out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    samples = [s for g in out.samples for s in g]
    for s in samples:
        s.check_alignment()
        assert s.response_length <= max_len and 0.0 <= s.reward <= 1.0 and "generate_error" not in s.metadata
    data = to_train_data(out.samples, args)
    assert [len(m) for m in data.loss_masks] == data.response_lengths
    return samples, out.metrics


def _tool_span_is_masked(sample, tokenizer, marker: str) -> bool:
    """The tool turn (from its chat header to the next assistant header) has loss_mask 0 throughout."""
    response = sample.tokens[sample.prompt_length :]
    text_upto = [tokenizer.decode(response[: i + 1]) for i in range(len(response))]
    first = next(i for i, t in enumerate(text_upto) if marker in t)
    return sample.loss_mask[first] == 0


def test_search_agent_searches_the_local_index(smollm2_behind_router, smollm2_path, tmp_path, write_jsonl):
    from examples.search_r1.corpus import build_corpus, questions
    from slime.utils.processing_utils import load_tokenizer

    rows = questions(build_corpus()[1])[:3]
    samples, metrics = _rollout(
        smollm2_behind_router, smollm2_path, tmp_path, write_jsonl(rows), "examples.search_r1.agent", 96
    )
    searched = [s for s in samples if s.metadata["searches"]]
    assert len(searched) >= 3, [s.response for s in samples]
    tok = load_tokenizer(smollm2_path)
    for s in searched:
        assert "<|im_start|>tool\n[1]" in s.response or "No results." in s.response
        assert _tool_span_is_masked(s, tok, "<|im_start|>tool")
        assert 0 < s.loss_mask.count(1) < s.response_length
    assert 0 < metrics["rollout/masked_token_ratio"] < 1


def test_python_tool_agent_runs_code_in_the_sandbox(smollm2_behind_router, smollm2_path, tmp_path):
    from slime.utils.processing_utils import load_tokenizer

    samples, metrics = _rollout(
        smollm2_behind_router, smollm2_path, tmp_path, "builtin:arithmetic:train:3:0", "examples.retool.agent", 128
    )
    ran = [s for s in samples if s.metadata["tool_calls"]]
    assert len(ran) >= 3, [s.response for s in samples]
    tok = load_tokenizer(smollm2_path)
    for s in ran:
        assert _tool_span_is_masked(s, tok, "<|im_start|>tool")
    outputs = [s.response.split("<|im_start|>tool\n", 1)[1].split("<|im_end|>")[0] for s in ran]
    assert any(o and not o.startswith("Error") for o in outputs) or any(s.metadata["tool_errors"] for s in ran)
