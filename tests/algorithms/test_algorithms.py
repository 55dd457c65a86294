"""KL estimators, entropy, aggregation and the LR schedule against float64 references written with plain loops.
(Estimators, policy/value losses and corrections: tests/algorithms/test_estimators.py.)"""

import math
import random

import pytest
import torch

from slime.algorithms.losses import KL_ESTIMATORS, aggregate
from slime.trainer.log_probs import token_log_probs
from slime.trainer.optimizer import lr_at


def _rand(n, scale=1.0, seed=0):
    rng = random.Random(seed)
    return [rng.gauss(0, scale) for _ in range(n)]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators_match_reference(kind):
    lp, ref = _rand(100, 1.0, 4), _rand(100, 1.0, 5)
    lp[0], ref[0] = -30.0, 0.0  # a far-off token: low_var_kl clamps
    got = KL_ESTIMATORS[kind](torch.tensor(lp, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64))
    for i in range(100):
        d = lp[i] - ref[i]
        want = {
            "k1": d,
            "k2": d * d / 2,
            "k3": math.exp(-d) - 1 + d,
            "low_var_kl": min(10.0, max(-10.0, math.exp(max(-20, min(20, -d))) - 1 - max(-20, min(20, -d)))),
        }[kind]
        assert got[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_kl_k3_is_unbiased_for_the_true_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    expected_k3 = float((p * KL_ESTIMATORS["k3"](p.log(), q.log())).sum())  # exact expectation under p
    expected_k1 = float((p * KL_ESTIMATORS["k1"](p.log(), q.log())).sum())
    assert expected_k3 == pytest.approx(true_kl, rel=1e-12)
    assert expected_k1 == pytest.approx(true_kl, rel=1e-12)


def test_token_log_probs_and_entropy_match_reference():
    """Log-prob of the target and entropy of softmax(z / T), against sums over exp written out in float64."""
    logits = torch.tensor(_rand(5 * 7, 2.0, 6), dtype=torch.float64).reshape(5, 7)
    targets = torch.tensor([0, 6, 3, 3, 1])
    log_probs, entropy = token_log_probs(logits, targets, temperature=0.7)
    for r in range(5):
        z = [math.exp(x / 0.7) for x in logits[r].tolist()]
        ps = [x / sum(z) for x in z]
        assert entropy[r].item() == pytest.approx(-sum(p * math.log(p) for p in ps), rel=1e-12)
        assert log_probs[r].item() == pytest.approx(math.log(ps[targets[r]]), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_token_log_probs_gradients_match_autograd(monkeypatch, chunk, temperature):
    """The hand-written backward (recomputed per chunk of rows) against float64 autograd through log_softmax, for the
    log-prob alone, the entropy alone and both, with rows split across chunks."""
    import slime.trainer.log_probs as lp

    monkeypatch.setitem(lp.CHUNK_ELEMENTS, "cpu", chunk * 9)
    logits = torch.tensor(_rand(7 * 9, 3.0, 11), dtype=torch.float64).reshape(7, 9).requires_grad_()
    targets = torch.tensor([0, 8, 4, 4, 1, 2, 7])
    g_lp, g_ent = (
        torch.tensor(_rand(7, 1.0, 12), dtype=torch.float64),
        torch.tensor(_rand(7, 1.0, 13), dtype=torch.float64),
    )
    log_p = torch.log_softmax(logits / temperature, -1)
    ref_lp, ref_ent = log_p.gather(-1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
    for use_lp, use_ent in ((1, 0), (0, 1), (1, 1)):
        got_lp, got_ent = token_log_probs(logits, targets, temperature, entropy_grad=True)
        want = torch.autograd.grad(
            use_lp * (ref_lp * g_lp).sum() + use_ent * (ref_ent * g_ent).sum(), logits, retain_graph=True
        )[0]
        got = torch.autograd.grad(use_lp * (got_lp * g_lp).sum() + use_ent * (got_ent * g_ent).sum(), logits)[0]
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: token_log_probs(x, targets, temperature, True), (logits,))
    assert token_log_probs(logits, targets, temperature, want_entropy=False)[1] is None


@pytest.mark.parametrize("per_token", [False, True])
def test_aggregate_is_exact_under_any_split(per_token):
    lengths = [3, 0, 5, 2, 4, 1]
    values = _rand(sum(lengths), 1.0, 7)
    mask = [1, 1, 0] + [1, 0, 1, 1, 1] + [0, 0] + [1, 1, 1, 1] + [1]
    # reference over the whole batch
    if per_token:
        want = sum(v * m for v, m in zip(values, mask, strict=True)) / sum(mask)
        normalizer = float(sum(mask))
    else:
        want, o = 0.0, 0
        for n in lengths:
            m = mask[o : o + n]
            want += sum(v * k for v, k in zip(values[o : o + n], m, strict=True)) / max(sum(m), 1)
            o += n
        want /= len(lengths)
        normalizer = float(len(lengths))
    for split in ([6], [2, 4], [1, 1, 1, 1, 1, 1], [4, 2]):  # samples per micro-batch
        total, s, o = 0.0, 0, 0
        for k in split:
            ls = lengths[s : s + k]
            n = sum(ls)
            v = torch.tensor(values[o : o + n], dtype=torch.float64)
            m = torch.tensor(mask[o : o + n], dtype=torch.float64)
            total += aggregate(v, m, ls, per_token, normalizer).item()
            s, o = s + k, o + n
        assert total == pytest.approx(want, rel=1e-12)


def test_lr_schedule():
    assert [lr_at(s, 1.0, 0.0, 4, 10, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(4, 1.0, 0.1, 4, 10, "linear") == pytest.approx(1.0)
    assert lr_at(10, 1.0, 0.1, 4, 10, "linear") == pytest.approx(0.1)
    assert lr_at(7, 1.0, 0.0, 4, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(50, 1.0, 0.0, 4, 10, "cosine") == pytest.approx(0.0)
