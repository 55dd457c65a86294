import math

import pytest
import torch

from slime.engine.sampling import SamplingParams, SamplingParamsError, sample_next


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(SamplingParamsError, match="sampling_params.temprature"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_unsupported_key_only_at_neutral_value():
    assert SamplingParams.from_dict({"frequency_penalty": 0.0, "n": 1}).temperature == 1.0
    with pytest.raises(SamplingParamsError, match="frequency_penalty"):
        SamplingParams.from_dict({"frequency_penalty": 0.5})


@pytest.mark.parametrize("raw", [{"top_p": 0}, {"temperature": -1}, {"max_new_tokens": -2}, {"stop": [""]}])
def test_bad_values(raw):
    with pytest.raises(SamplingParamsError, match=next(iter(raw))):
        SamplingParams.from_dict(raw)


def test_stop_string_becomes_list_and_null_means_default():
    p = SamplingParams.from_dict({"stop": "\n\n", "top_k": None})
    assert p.stop == ["\n\n"] and p.top_k == -1


def test_logprob_is_temperature_scaled_before_truncation():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, dtype=torch.float64)
    params = [SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(temperature=1.3, top_k=3), SamplingParams()]
    toks, lps = sample_next(logits, params, [None] * 3)
    for i, p in enumerate(params):
        row = [x / p.temperature for x in logits[i].tolist()]
        lse = math.log(sum(math.exp(x) for x in row))
        assert lps[i].item() == pytest.approx(row[toks[i]] - lse, abs=1e-5)


def test_truncation_keeps_sampled_tokens_inside_the_nucleus_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4000))
    g = torch.Generator().manual_seed(1)
    toks, _ = sample_next(logits, [SamplingParams(top_p=0.7)] * 4000, [None] * 4000, g)
    assert set(toks.tolist()) == {0, 1}  # 0.5 alone < 0.7, so the nucleus is {0, 1}
    toks, _ = sample_next(logits, [SamplingParams(top_k=1)] * 4000, [None] * 4000, g)
    assert set(toks.tolist()) == {0}
    toks, _ = sample_next(logits, [SamplingParams()] * 4000, [None] * 4000, g)
    freq = torch.bincount(toks, minlength=4).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.03)


def test_greedy_and_seeded_rows():
    logits = torch.randn(2, 100)
    toks, lps = sample_next(logits, [SamplingParams(temperature=0.0)] * 2, [None] * 2)
    assert toks.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(lps, torch.log_softmax(logits, -1).max(-1).values)
    seeded = [SamplingParams(sampling_seed=7)]
    a = sample_next(logits[:1], seeded, [torch.Generator().manual_seed(7)])[0]
    b = sample_next(logits[:1], seeded, [torch.Generator().manual_seed(7)])[0]
    assert a.tolist() == b.tolist()


def test_sampled_frequencies_match_float64_probabilities_across_buckets():
    """The two-level inverse-CDF sampler draws each token with its softmax probability (float64 reference), including
    tokens at bucket edges and in the short last bucket (2,500 = 2 x 1,024 + 452), and never a zero-probability one."""
    vocab, rows = 2500, 40000
    picks = {0: 0.5, 1023: 2.0, 1024: 1.0, 2047: -1.0, 2048: 0.0, 2499: 1.5, 1500: -3.0}
    logits = torch.full((vocab,), float("-inf"), dtype=torch.float64)
    for t, x in picks.items():
        logits[t] = x
    expected = torch.softmax(logits, -1)  # float64
    g = torch.Generator().manual_seed(5)
    toks, _ = sample_next(logits.float().expand(rows, vocab), [SamplingParams()] * rows, [None] * rows, g)
    assert set(toks.tolist()) <= set(picks)
    freq = torch.bincount(toks, minlength=vocab).double() / rows
    sigma = (expected * (1 - expected) / rows).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (freq[list(picks)], expected[list(picks)])


@pytest.mark.parametrize("only", [0, 1023, 1024, 2499])
def test_a_single_possible_token_is_always_drawn(only):
    logits = torch.full((64, 2500), float("-inf"))
    logits[:, only] = 0.0
    toks, lps = sample_next(logits, [SamplingParams(temperature=0.9)] * 64, [None] * 64, torch.Generator())
    assert toks.tolist() == [only] * 64 and torch.all(lps == 0)


FUSED_CHECK = r"""
import json, torch
from slime.engine.triton_sample import sample_rows_fused

torch.manual_seed(0)
vocab, rows, calls = 20, 64, 8  # small: the interpreter is slow
base = torch.randn(vocab)
logits = base.expand(rows, vocab).to(torch.bfloat16).contiguous()
temperature, greedy = torch.full((rows,), 0.5), torch.zeros(rows, dtype=torch.bool)
greedy[-1], temperature[-1] = True, 1.0
counts, lp_err = torch.zeros(vocab), 0.0
ref = torch.log_softmax(logits.double() / temperature.double()[:, None], -1)
greedy_draws = set()
for seed in range(calls):
    tokens, logprobs = sample_rows_fused(logits, temperature, greedy, torch.tensor([seed]), block=32)
    lp_err = max(lp_err, (logprobs.double() - ref.gather(1, tokens[:, None])[:, 0]).abs().max().item())
    counts += torch.bincount(tokens[:-1], minlength=vocab)
    greedy_draws.add(int(tokens[-1]))
# the noise depends on (seed, row, token) only: read in three blocks, the same seed must draw the same tokens
blocked, blocked_lp = sample_rows_fused(logits, temperature, greedy, torch.tensor([calls - 1]), block=8)
expected = torch.softmax(logits[0].double() / 0.5, -1) * counts.sum()
keep = expected >= 5  # chi-square over the categories with enough expected draws, the rest pooled
observed = torch.cat([counts[keep].double(), counts[~keep].double().sum()[None]])
expect = torch.cat([expected[keep], expected[~keep].sum()[None]])
chi2 = ((observed - expect) ** 2 / expect).sum().item()
print(json.dumps({"chi2": chi2, "df": int(keep.sum()), "lp_err": lp_err, "greedy": sorted(greedy_draws),
                  "argmax": int(logits[-1].float().argmax()), "blocks_agree": torch.equal(blocked, tokens),
                  "blocks_lp_err": (blocked_lp - logprobs).abs().max().item()}))
"""


def test_fused_sampler_draws_the_softmax_distribution_and_its_log_probs():
    """The CUDA decode step's Triton sampler, run on this CPU by Triton's interpreter (a process of its own):
    504 draws at temperature 0.5 over a 20-token vocabulary follow softmax(logits / 0.5) by a chi-square test, every
    returned log-prob equals the float64 log-softmax at the drawn token, a greedy row takes the argmax every time,
    and reading the vocabulary in three blocks (online log-sum-exp, argmax across blocks) draws the same tokens."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", FUSED_CHECK], capture_output=True, text=True, timeout=300, env=env, cwd=root
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["lp_err"] < 1e-5, r
    assert r["greedy"] == [r["argmax"]], r
    assert r["blocks_agree"] and r["blocks_lp_err"] < 1e-6, r
    assert r["chi2"] < r["df"] + 5 * math.sqrt(2 * r["df"]), r  # mean df, sd sqrt(2 df): far in the tail if wrong
