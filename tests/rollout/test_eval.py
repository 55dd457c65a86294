"""Evaluation: unbiased pass@k against brute force, per-dataset metrics, and the eval config (YAML and flags)."""

import itertools
from fractions import Fraction

import pytest

from slime.config.arguments import parse_args
from slime.observe.eval_metrics import dataset_metrics, ks_for, pass_at_k
from slime.utils.eval_config import EvalConfigError, eval_dataset_configs, read_eval_config
from slime.utils.types import Sample


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> Fraction:
    """Exact: the share of all k-subsets of the n samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return Fraction(sum(any(outcomes[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(outcomes, k)), abs=1e-12)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_ks_for():
    assert ks_for(1) == [1] and ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6] and ks_for(16)[-1] == 16


def test_dataset_metrics():
    # 2 prompts x 4 samples: prompt 0 has 1 correct, prompt 1 has none; a dict reward's `acc` decides correctness
    rewards = [1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, -1.0]
    samples = [
        Sample(response_length=10 * (i + 1), status=Sample.Status.COMPLETED, reward=r) for i, r in enumerate(rewards)
    ]
    samples[5].reward, samples[5].status = {"score": 0.5, "acc": False}, Sample.Status.TRUNCATED
    m = dataset_metrics("toy", {"rewards": rewards, "samples": samples}, 4)
    assert m["eval/toy/reward_mean"] == pytest.approx(0.5 / 8)
    assert m["eval/toy/accuracy"] == pytest.approx(1 / 8) and m["eval/toy/num_prompts"] == 2
    assert m["eval/toy/pass@1"] == pytest.approx((1 / 4) / 2)
    assert m["eval/toy/pass@2"] == pytest.approx((1 - 3 / 4 * 2 / 3) / 2)
    assert m["eval/toy/pass@4"] == pytest.approx(0.5)
    assert m["eval/toy/response_len_mean"] == pytest.approx(45) and m["eval/toy/truncated_ratio"] == 1 / 8
    with pytest.raises(ValueError, match="do not form prompts of 3 samples"):
        dataset_metrics("toy", {"rewards": rewards, "samples": samples}, 3)


BASE = ["--hf-checkpoint", "m", "--prompt-data", "d.jsonl", "--rm-type", "math", "--label-key", "answer"]


def test_eval_config_yaml_defaults_and_fallbacks(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("""
eval:
  defaults:
    n_samples_per_eval_prompt: 4
    temperature: 0.6
  datasets:
    - name: gsm8k
      path: g.jsonl
      rm_type: math
      prompt_key: question
      max_prompts: 50
    - name: gpqa
      path: q.jsonl
      rm_type: gpqa
      temperature: 0.0
      n_samples_per_eval_prompt: 1
      metadata_overrides: {split: test}
""")
    args = parse_args(
        [
            *BASE,
            "--eval-config",
            str(cfg),
            "--eval-prompt-data",
            "extra",
            "e.jsonl",
            "--eval-max-response-len",
            "64",
            "--eval-top-p",
            "0.9",
        ]
    )
    by = {c.name: c for c in args.eval_datasets}
    assert list(by) == ["gsm8k", "gpqa", "extra"] and by == {c.name: c for c in eval_dataset_configs(args)}
    g, q, e = by["gsm8k"], by["gpqa"], by["extra"]
    assert (g.input_key, g.label_key, g.n_samples_per_eval_prompt, g.temperature, g.max_prompts) == (
        "question",
        "answer",
        4,
        0.6,
        50,
    )
    assert (q.temperature, q.n_samples_per_eval_prompt, q.top_p, q.max_response_len) == (0.0, 1, 0.9, 64)
    assert q.inject_metadata({"a": 1}) == {"a": 1, "rm_type": "gpqa", "split": "test"}
    assert (e.input_key, e.n_samples_per_eval_prompt, e.temperature, e.rm_type) == ("input", 1, 1.0, None)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "eval:\n  datasets:\n    - name: a\n      path: p\n      temprature: 0.5\n",
            "unknown field(s) ['temprature']",
        ),
        ("eval:\n  datasets:\n    - path: p\n", "eval.datasets[0] has no 'name'"),
        ("eval:\n  nothing: 1\n", "expected `eval: {datasets: [...]}`"),
        ("eval: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_eval_config_names_the_file_and_entry(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(EvalConfigError, match="bad.yaml") as err:
        read_eval_config(str(cfg))
    assert message in str(err.value)


def test_eval_config_mapping_form(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("eval:\n  datasets:\n    aime: {path: a.jsonl, n_samples_per_eval_prompt: 8}\n")
    assert read_eval_config(str(cfg)) == [{"name": "aime", "path": "a.jsonl", "n_samples_per_eval_prompt": 8}]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-interval", "5"], "--eval-interval needs a positive value and eval datasets"),
        (["--eval-prompt-data", "a", "x", "a", "y"], "eval dataset name(s) ['a'] used twice"),
        (["--eval-prompt-data", "a", "x", "--eval-top-p", "0"], "eval dataset 'a': sampling_params.top_p"),
        (["--eval-prompt-data", "a", "x", "--eval-max-prompts", "0"], "max_prompts must be at least 1"),
        (["--disable-rollout-global-dataset"], "needs a --rollout-function-path that brings its own prompts"),
    ],
)
def test_bad_eval_flags_are_refused(capsys, extra, message):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert message in capsys.readouterr().err


def test_sampling_params_for_training_and_for_evaluation_without_a_dataset_config():
    from slime.rollout.sglang_rollout import sampling_params

    args = parse_args(
        [
            *BASE,
            "--rollout-temperature",
            "0.8",
            "--eval-temperature",
            "0",
            "--eval-top-p",
            "0.9",
            "--rollout-max-response-len",
            "48",
            "--rollout-stop",
            "END",
        ]
    )
    train, ev = sampling_params(args), sampling_params(args, evaluation=True)
    assert (train["temperature"], train["top_p"], train["max_new_tokens"], train["stop"]) == (0.8, 1.0, 48, ["END"])
    assert (ev["temperature"], ev["top_p"], ev["max_new_tokens"], ev["stop"]) == (0.0, 0.9, 48, ["END"])


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{name: a, path: a.jsonl, rm_type: ifbench}", "eval dataset 'a': unknown rm_type 'ifbench'"),
        ("{name: a, path: a.jsonl, rm_type: remote_rm}", "eval dataset 'a': rm_type remote_rm needs --rm-url"),
        ("{name: a, path: a.jsonl, custom_rm_path: 'tests.custom_hooks:nope'}", "has no attribute 'nope'"),
    ],
)
def test_eval_yaml_rewards_are_checked_at_start(tmp_path, capsys, entry, message):
    """A reward an eval dataset names must exist before anything starts (a typo used to score every sample 0)."""
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"eval:\n  datasets:\n    - {entry}\n")
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--eval-config", str(cfg)])
    assert message in capsys.readouterr().err


def test_eval_yaml_custom_rm_path_reaches_the_samples(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        "eval:\n  datasets:\n    - {name: a, path: a.jsonl, custom_rm_path: 'tests.custom_hooks.length_reward'}\n"
    )
    (dataset,) = parse_args(BASE + ["--eval-config", str(cfg)]).eval_datasets
    assert dataset.inject_metadata({"k": 1}) == {"k": 1, "custom_rm_path": "tests.custom_hooks.length_reward"}
