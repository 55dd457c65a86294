"""`slime data prepare`: public datasets in their own layouts (small samples shipped in tests/data/samples) become
slime's JSONL, which the prompt loader reads and the math reward grades."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slime.data.dataset import load_prompt_data
from slime.data.prepare import PrepareError, prepare
from slime.rollout.rm_hub.math_utils import grade_math

SAMPLES = Path(__file__).parent / "samples"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name,source,labels",
    [
        ("gsm8k", "gsm8k.jsonl", ["159", "30000", "18"]),  # "#### 30,000": the separator dropped
        ("math", "math.jsonl", ["\\frac{11}{8}", "6", "9"]),  # the last \boxed{} of the solution, braces balanced
        ("math500", "math500.jsonl", ["11", "5"]),  # the answer field
        ("mawps", "mawps.json", ["13", "90"]),  # Body + Question, Answer 13.0 read as 13
        ("mawps", "calc_mawps.jsonl", ["8", "43"]),  # the hub's layout: question, result
    ],
)
def test_each_dataset_becomes_prompts_and_gradable_labels(tmp_path, name, source, labels):
    out = tmp_path / f"{name}.jsonl"
    assert prepare(name, str(out), source=str(SAMPLES / source), prompt_suffix=" Answer in \\boxed{}.") == len(labels)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == labels
    assert all(r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"].endswith("in \\boxed{}.") for r in rows)
    dataset = load_prompt_data(str(out), None, input_key="prompt", label_key="label")
    assert [s.label for s in dataset.samples] == labels
    for label in labels:  # what a correct response looks like to the reward the examples use
        assert grade_math(f"So the answer is \\boxed{{{label}}}.", label) == 1.0


def test_a_row_of_another_layout_is_refused_naming_file_line_and_keys(tmp_path):
    with pytest.raises(PrepareError, match=r"gsm8k\.jsonl:1: not a math row: none of the keys \['problem'"):
        prepare("math", str(tmp_path / "out.jsonl"), source=str(SAMPLES / "gsm8k.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(PrepareError, match=r"broken\.jsonl:1: not a gsm8k row: 'answer' has no '#### <number>'"):
        prepare("gsm8k", str(tmp_path / "out.jsonl"), source=str(broken))
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written


def test_the_command_line_writes_the_file_or_says_why_not(tmp_path):
    out = tmp_path / "g.jsonl"
    cmd = [sys.executable, "-m", "slime.cli", "data", "prepare", "gsm8k", str(out)]
    done = subprocess.run([*cmd, "--source", str(SAMPLES / "gsm8k.jsonl"), "--limit", "2"], cwd=ROOT, text=True,
                          capture_output=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and f"wrote 2 rows to {out}" in done.stdout, done.stderr
    missing = subprocess.run([*cmd, "--source", str(tmp_path / "nope.jsonl")], cwd=ROOT, text=True,
                             capture_output=True, timeout=120)  # fmt: skip
    assert missing.returncode == 1 and "nope.jsonl" in missing.stderr and "Traceback" not in missing.stderr
