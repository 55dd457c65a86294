import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slime.data.builtin import arithmetic_rows, split_of
from slime.data.dataset import DataError, load_prompt_data
from slime.rollout.data_source import RolloutDataSource, RolloutDataSourceWithBuffer


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


GOOD = {"input": "What is 2+2?", "label": "4", "metadata": {"k": 1}}


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", r":2: invalid JSON"),
        ({"question": "x", "label": "1"}, r":2: missing key 'input' \(--input-key\)"),
        ({"input": 5, "label": "1"}, r":2: key 'input' is a int"),
        ({"input": "   ", "label": "1"}, r":2: key 'input' is an empty prompt"),
        ({"input": "q"}, r":2: missing key 'label' \(--label-key\)"),
        ({"input": "q", "label": "1", "metadata": [1]}, r":2: key 'metadata' is a list"),
    ],
)
def test_bad_rows_fail_with_file_line_and_key(tok, write_jsonl, bad, match):
    path = write_jsonl([GOOD, bad])
    with pytest.raises(DataError, match=match) as err:
        load_prompt_data(path, tok, label_key="label")
    assert path in str(err.value)


def test_a_broken_training_row_stops_the_run_in_one_line_before_anything_starts(tiny_model_path, write_jsonl):
    """train.py with a broken --prompt-data row: exit status 2 and one line naming file, line and key, before Ray,
    trainer or engines start (they used to start first: 25-60 s, then a long Ray traceback)."""
    import subprocess
    import sys
    from pathlib import Path

    path = write_jsonl([GOOD, GOOD, {"question": "x", "label": "1"}])
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "train.py", "--hf-checkpoint", tiny_model_path, "--prompt-data", str(path)]
    cmd += ["--label-key", "label", "--rm-type", "math", "--num-rollout", "1"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"slime: {path}:3: missing key 'input' (--input-key); row has " + (
        "['label', 'question']"
    )
    assert "Traceback" not in done.stderr and "rollout:" not in done.stdout  # no engine was started


def test_eval_rows_are_checked_with_the_training_rows(tiny_model_path, write_jsonl):
    """check_prompt_files reads the eval datasets too (only as many rows as max_prompts takes)."""
    from slime.config.arguments import parse_args
    from slime.rollout.data_source import check_prompt_files

    train = write_jsonl([GOOD, GOOD], "train.jsonl")
    held = write_jsonl([GOOD, GOOD, {"input": "q"}], "held.jsonl")
    flags = ["--hf-checkpoint", tiny_model_path, "--prompt-data", str(train), "--label-key", "label"]
    flags += ["--rm-type", "math", "--eval-prompt-data", "held", str(held)]
    with pytest.raises(DataError, match=rf"{held}:3: missing key 'label'"):
        check_prompt_files(parse_args(flags))
    check_prompt_files(parse_args([*flags, "--eval-max-prompts", "2"]))  # the broken row is never read


def test_bad_rows_skipped_and_counted_on_request(tok, write_jsonl):
    path = write_jsonl([GOOD, "{oops", {"input": ""}, {"x": 1}, GOOD])
    ds = load_prompt_data(path, tok, label_key="label", skip_invalid=True)
    assert len(ds) == 2
    assert ds.skipped == {"invalid_json": 1, "empty_prompt": 1, "missing_input_key": 1}
    assert ds.samples[0].metadata == {"k": 1, "source_line": 1} and ds.samples[1].metadata["source_line"] == 5


def test_chat_template_and_max_prompt_len(tok, write_jsonl):
    rows = [{"p": [{"role": "user", "content": "hi"}], "l": 3}, {"p": "word " * 200, "l": "x"}]
    path = write_jsonl(rows)
    ds = load_prompt_data(path, tok, input_key="p", label_key="l", apply_chat_template=True, max_prompt_len=64)
    assert len(ds) == 1 and ds.skipped == {"over_max_prompt_len": 1}
    assert ds.samples[0].prompt.endswith("<|im_start|>assistant\n") and ds.samples[0].label == "3"
    # without the template, chat messages stay messages (for a generate function or the SFT rollout), as in slime
    raw = load_prompt_data(path, tok, input_key="p", label_key="l")
    assert raw.samples[0].prompt == [{"role": "user", "content": "hi"}]


def test_parquet(tok, tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "input": "other"}]), path)
    ds = load_prompt_data(str(path), tok, label_key="label")
    assert [s.prompt for s in ds.samples] == ["What is 2+2?", "other"]


def test_shared_gsm8k_loads(tok):
    from tests.conftest import SHARED_DATA

    ds = load_prompt_data(
        str(SHARED_DATA / "gsm8k/train.jsonl"), tok, input_key="prompt", label_key="label", apply_chat_template=True
    )
    assert len(ds) > 7000 and all(s.label for s in ds.samples)


def test_builtin_splits_are_seeded_and_disjoint():
    train, test = arithmetic_rows("train", 300, seed=3), arithmetic_rows("test", 100, seed=3)
    assert train == arithmetic_rows("train", 300, seed=3)
    assert train != arithmetic_rows("train", 300, seed=4)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train[:50]:
        assert split_of(r["prompt"].rsplit(" Solve", 1)[0]) == "train"
        assert int(r["label"]) >= 0


def _source_args(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(
        **{
            "n_samples_per_prompt": 3,
            "rollout_shuffle": True,
            "rollout_seed": 1,
            "rollout_global_dataset": True,
            "buffer_filter_path": None,
            **kw,
        }
    )


def test_data_source_epochs_groups_and_state(tok, write_jsonl):
    path = write_jsonl([{"input": f"q{i}"} for i in range(5)])
    src = RolloutDataSource(_source_args(), load_prompt_data(path, tok))
    seen = []
    for _ in range(5):  # 10 prompts = two epochs
        for group in src.get_samples(2):
            assert len(group) == 3 and len({s.index for s in group}) == 3
            assert len({s.group_index for s in group}) == 1
            seen.append(group[0].prompt)
    assert sorted(seen) == sorted([f"q{i}" for i in range(5)] * 2) and src.epoch == 1
    src.get_samples(1)  # stop mid-epoch: 11 prompts served
    state = json.loads(json.dumps(src.state_dict()))
    rest = [(g[0].prompt, g[0].index, g[0].group_index) for g in src.get_samples(7)]  # crosses into the 4th epoch
    src2 = RolloutDataSource(_source_args(), load_prompt_data(path, tok))
    src2.load_state_dict(state)
    assert [(g[0].prompt, g[0].index, g[0].group_index) for g in src2.get_samples(7)] == rest
    with pytest.raises(ValueError, match="expected"):
        src2.load_state_dict({"epoch": 1})
    with pytest.raises(RuntimeError, match="no buffer.*RolloutDataSourceWithBuffer"):
        src2.add_samples(src2.get_samples(1))


def test_buffered_groups_come_first_through_the_buffer_filter(tok, write_jsonl):
    path = write_jsonl([{"input": f"q{i}"} for i in range(6)])
    src = RolloutDataSourceWithBuffer(_source_args(rollout_shuffle=False), load_prompt_data(path, tok))
    first = src.get_samples(3)
    src.add_samples([first[2], first[0]])  # handed back in this order
    again = src.get_samples(3)
    assert [g[0].prompt for g in again] == ["q2", "q0", "q3"] and src.get_buffer_length() == 0
    assert again[0] is first[2]  # the same samples (partial responses and all), not copies
    with pytest.raises(ValueError, match="groups of --n-samples-per-prompt 3"):
        src.add_samples([first[1][:2]])
    newest_args = _source_args(rollout_shuffle=False, buffer_filter_path="tests.custom_hooks:pop_last")
    newest = RolloutDataSourceWithBuffer(newest_args, load_prompt_data(path, tok))
    newest.add_samples(newest.get_samples(3))
    newest.begin_rollout(7)  # as the rollout manager does before each rollout
    assert [g[0].prompt for g in newest.get_samples(2)] == ["q2", "q1"] and newest.get_buffer_length() == 1
    from tests.custom_hooks import SEEN_ROLLOUT_IDS

    assert SEEN_ROLLOUT_IDS[-1] == 7
    with pytest.raises(ImportError, match="--buffer-filter-path 'tests.custom_hooks:nope'"):
        RolloutDataSourceWithBuffer(
            _source_args(buffer_filter_path="tests.custom_hooks:nope"), load_prompt_data(path, tok)
        )


def test_tools_and_template_kwargs_reach_the_chat_template(tok, write_jsonl):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = (
        "{% for x in tools or [] %}TOOL:{{ x.name }};{% endfor %}"
        "{% if enable_thinking is defined %}THINK={{ enable_thinking }};{% endif %}"
        "{{ messages[0].content }}"
    )
    calc = {"name": "calculator", "description": "evaluates arithmetic"}
    rows = [{"input": "a", "metadata": {"tools": [calc]}}, {"input": "b", "tools": [{"name": "search"}]}]
    path = write_jsonl(rows)
    kw = dict(apply_chat_template=True, apply_chat_template_kwargs={"enable_thinking": False})
    from_metadata = load_prompt_data(path, t, **kw)
    assert [s.prompt for s in from_metadata.samples] == ["TOOL:calculator;THINK=False;a", "THINK=False;b"]
    from_key = load_prompt_data(path, t, tool_key="tools", **kw)  # --tool-key wins over the metadata
    assert [s.prompt for s in from_key.samples] == ["THINK=False;a", "TOOL:search;THINK=False;b"]
