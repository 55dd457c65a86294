"""Advantage estimators, policy/value losses, corrections and reducers against float64 references written here
with plain Python loops over lists (no code shared with slime.algorithms), on random ragged batches with loss
masks, including the edge cases: a group whose rewards are all equal, length-1 responses, fully masked samples."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from slime.algorithms.advantages import compute_advantages
from slime.algorithms.corrections import importance_weights
from slime.algorithms.losses import POLICY_RATIOS, clipped_surrogate, dr_grpo_pg_loss_reducer, value_loss
from slime.utils.types import TokenColumns

N = 4  # samples per group


def ragged_batch(seed: int, groups: int = 3) -> dict:
    """Lists of floats: rewards, and per sample mask / kl / values / old / teacher / rollout log-probs.
    Group 0 has all-equal rewards; sample 1 has one token; sample 2 is fully masked; sample 5 has a masked
    middle (a tool output) and a masked tail."""
    rng = random.Random(seed)
    b = groups * N
    lengths = [rng.randint(2, 9) for _ in range(b)]
    lengths[1] = 1
    masks = [[1] * n for n in lengths]
    masks[2] = [0] * lengths[2]
    lengths[5] = 8
    masks[5] = [1, 1, 0, 0, 1, 1, 0, 0]
    rewards = [1.0] * N + [float(rng.choice([0, 1, 0.5])) for _ in range(b - N)]

    def tok(scale, shift=0.0):
        return [[rng.gauss(shift, scale) for _ in range(n)] for n in lengths]

    return {
        "rewards": rewards,
        "lengths": lengths,
        "masks": masks,
        "kl": tok(0.3),
        "values": tok(0.5),
        "old": tok(0.5, -1.0),
        "teacher": tok(0.5, -1.0),
        "rollout": None,
    }


def as_columns(d: dict) -> TokenColumns:
    t = lambda rows: [torch.tensor(r, dtype=torch.float64) for r in rows]  # noqa: E731
    return TokenColumns(
        loss_masks=t(d["masks"]),
        kl=t(d["kl"]),
        values=t(d["values"]),
        old_log_probs=t(d["old"]),
        teacher_log_probs=t(d["teacher"]),
    )


def make_args(**kw) -> SimpleNamespace:
    base = dict(
        advantage_estimator="grpo",
        n_samples_per_prompt=N,
        disable_grpo_std_normalization=False,
        kl_coef=0.0,
        gamma=1.0,
        lambd=1.0,
        normalize_advantages=False,
        use_opd=False,
        opd_kl_coef=1.0,
    )
    return SimpleNamespace(**(base | kw))


def run(d: dict, **kw) -> tuple:
    args = make_args(**kw)
    adv, ret = compute_advantages(torch.tensor(d["rewards"], dtype=torch.float64), as_columns(d), args)
    return [a.tolist() for a in adv], (None if ret is None else [r.tolist() for r in ret])


def assert_close(got, want, tol=1e-10):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        for x, y in zip(g, w, strict=True):
            assert x == pytest.approx(y, abs=tol, rel=tol)


# ---------------------------------------------------------------- references (plain loops)
def ref_group_stats(rewards):
    means, stds = [], []
    for g in range(0, len(rewards), N):
        grp = rewards[g : g + N]
        m = sum(grp) / N
        means += [m] * N
        stds += [math.sqrt(sum((r - m) ** 2 for r in grp) / (N - 1))] * N
    return means, stds


def ref_seq_kl(d, i):
    return sum(k * m for k, m in zip(d["kl"][i], d["masks"][i], strict=True))


def ref_last_counted(mask):
    last = len(mask) - 1
    for t, m in enumerate(mask):
        if m:
            last = t
    return last


def ref_token_rewards(reward, kl, mask, coef):
    out = [-coef * k * m for k, m in zip(kl, mask, strict=True)]
    if out:
        out[ref_last_counted(mask)] += reward
    return out


def ref_whiten(adv, masks):
    vals = [a for row, mrow in zip(adv, masks, strict=True) for a, m in zip(row, mrow, strict=True) if m]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return [[(a - mean) / math.sqrt(var + 1e-8) for a in row] for row in adv]


# ---------------------------------------------------------------- estimators
@pytest.mark.parametrize("std_norm", [True, False])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.parametrize("name", ["grpo", "gspo"])
def test_grpo_and_gspo_advantages(name, kl_coef, std_norm):
    d = ragged_batch(1)
    rewards = [r - kl_coef * ref_seq_kl(d, i) for i, r in enumerate(d["rewards"])]
    means, stds = ref_group_stats(rewards)
    want = []
    for i, n in enumerate(d["lengths"]):
        a = rewards[i] - means[i]
        if std_norm:
            a /= stds[i] + 1e-6
        want.append([a] * n)
    got, ret = run(d, advantage_estimator=name, kl_coef=kl_coef, disable_grpo_std_normalization=not std_norm)
    assert_close(got, want)
    assert ret is None
    if kl_coef == 0:
        assert all(x == 0 for row in got[:N] for x in row)  # the all-equal group carries no signal


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_plus_plus(baseline, gamma):
    d = ragged_batch(2)
    coef = 0.05
    rewards = list(d["rewards"])
    if baseline:
        means, _ = ref_group_stats(rewards)
        rewards = [r - m for r, m in zip(rewards, means, strict=True)]
    returns = []
    for i, r in enumerate(rewards):
        if baseline:  # slime's definition: the centred reward on every token minus that token's KL penalty
            returns.append([r - coef * k for k in d["kl"][i]])
            continue
        tr = ref_token_rewards(r, d["kl"][i], d["masks"][i], coef)
        row, running = [0.0] * len(tr), 0.0
        for t in reversed(range(len(tr))):
            running = tr[t] + gamma * running
            row[t] = running
        returns.append(row)
    name = "reinforce_plus_plus_baseline" if baseline else "reinforce_plus_plus"
    got, _ = run(d, advantage_estimator=name, kl_coef=coef, gamma=gamma, normalize_advantages=True)
    assert_close(got, ref_whiten(returns, d["masks"]), tol=1e-9)


@pytest.mark.parametrize("gamma,lambd", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_ppo_gae(gamma, lambd):
    d = ragged_batch(3)
    coef = 0.02
    want_adv, want_ret = [], []
    for i, r in enumerate(d["rewards"]):
        tr = ref_token_rewards(r, d["kl"][i], d["masks"][i], coef)
        v = d["values"][i]
        n = len(tr)
        adv = [0.0] * n
        for t in range(n):  # the definition: sum_k (gamma lambd)^k delta_{t+k}, not the recursion
            for k in range(t, n):
                nxt = v[k + 1] if k + 1 < n else 0.0
                adv[t] += (gamma * lambd) ** (k - t) * (tr[k] + gamma * nxt - v[k])
        want_adv.append(adv)
        want_ret.append([a + x for a, x in zip(adv, v, strict=True)])
    got, ret = run(d, advantage_estimator="ppo", kl_coef=coef, gamma=gamma, lambd=lambd)
    assert_close(got, want_adv, tol=1e-9)
    assert_close(ret, want_ret, tol=1e-9)
    # lambda = 1, gamma = 1, no KL: A_t = R - V_t, the Monte-Carlo advantage, up to the model's last counted token
    if gamma == 1.0 and lambd == 1.0:
        got, _ = run(d, advantage_estimator="ppo")
        want = [
            [(d["rewards"][i] if t <= ref_last_counted(d["masks"][i]) else 0.0) - x for t, x in enumerate(v)]
            for i, v in enumerate(d["values"])
        ]
        assert_close(got, want, tol=1e-9)


def test_on_policy_distillation_and_opd_penalty():
    d = ragged_batch(4)
    got, _ = run(d, advantage_estimator="on_policy_distillation", use_opd=True, opd_kl_coef=0.7)
    want = [[0.7 * (t - o) for t, o in zip(d["teacher"][i], d["old"][i], strict=True)] for i in range(12)]
    assert_close(got, want)  # --opd-kl-coef scales the distillation advantage as it scales the --use-opd penalty
    # --use-opd on top of GRPO: A_t = grpo_t - coef * (old_t - teacher_t)
    base, _ = run(d)
    got, _ = run(d, use_opd=True, opd_kl_coef=0.5)
    want = [
        [a - 0.5 * (o - t) for a, o, t in zip(base[i], d["old"][i], d["teacher"][i], strict=True)] for i in range(12)
    ]
    assert_close(got, want)


def test_normalize_advantages_whitens_over_masked_tokens():
    d = ragged_batch(5)
    raw, _ = run(d)
    got, _ = run(d, normalize_advantages=True)
    assert_close(got, ref_whiten(raw, d["masks"]), tol=1e-9)
    counted = [x for row, m in zip(got, d["masks"], strict=True) for x, k in zip(row, m, strict=True) if k]
    assert sum(counted) / len(counted) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- policy losses
def ref_surrogate(ratio, a, lo, hi, dual):
    clipped = min(max(ratio, 1 - lo), 1 + hi)
    loss = max(-ratio * a, -clipped * a)
    if dual is not None and a < 0:
        loss = min(loss, -dual * a)
    return loss, float(-clipped * a > -ratio * a)


def flat(rows):
    return torch.tensor([x for r in rows for x in r], dtype=torch.float64)


@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_policy_losses_match_reference(name, dual):
    d = ragged_batch(6)
    rng = random.Random(7)
    lp = [[o + rng.gauss(0, 0.3) for o in row] for row in d["old"]]
    adv = [[rng.gauss(0, 1) for _ in row] for row in d["old"]]
    lo, hi = (0.2, 0.28) if name == "ppo" else (0.03, 0.04)  # GSPO's sequence ratios sit much closer to 1
    want_loss, want_clip, want_kl = [], [], []
    for i in range(len(lp)):
        m = d["masks"][i]
        if name == "gspo":
            seq = sum((x - o) * k for x, o, k in zip(lp[i], d["old"][i], m, strict=True)) / max(sum(m), 1)
            log_ratios = [seq] * len(m)
        else:
            log_ratios = [x - o for x, o in zip(lp[i], d["old"][i], strict=True)]
        for lr, a in zip(log_ratios, adv[i], strict=True):
            loss, clip = ref_surrogate(math.exp(lr), a, lo, hi, dual)
            want_loss.append(loss)
            want_clip.append(clip)
            want_kl.append(-lr)
    log_ratio = POLICY_RATIOS[name](flat(lp), flat(d["old"]), flat(d["masks"]), d["lengths"])
    got = clipped_surrogate(log_ratio, flat(adv), lo, hi, dual)
    assert got["loss"].tolist() == pytest.approx(want_loss, abs=1e-12)
    assert got["clipfrac"].tolist() == want_clip
    assert got["ppo_kl"].tolist() == pytest.approx(want_kl, abs=1e-12)
    assert 0 < sum(want_clip) < len(want_clip)  # both branches exercised


def test_surrogate_stays_finite_for_extreme_log_ratios():
    """fp32 exp overflows above 88: the clamped log-ratio keeps loss and gradient finite, and leaves moderate ratios
    exactly as they were (float64 reference: the unclamped formula)."""
    log_ratio = torch.tensor([-200.0, -5.0, 0.1, 5.0, 100.0, 300.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, -1.0, 1.0])
    out = clipped_surrogate(log_ratio, adv, 0.2, 0.28, None)
    out["loss"].sum().backward()
    assert torch.isfinite(out["loss"]).all() and torch.isfinite(log_ratio.grad).all()
    for i in (1, 2, 3):
        want, _ = ref_surrogate(math.exp(float(log_ratio[i].detach())), float(adv[i]), 0.2, 0.28, None)
        assert float(out["loss"][i].detach()) == pytest.approx(want, rel=1e-6)
    assert float(out["loss"][4].detach()) == pytest.approx(math.exp(20.0), rel=1e-6)  # -r·A at the bound, A = -1


def test_ppo_gradient_matches_finite_differences():
    rng = random.Random(8)
    old = torch.tensor([rng.gauss(-1, 0.5) for _ in range(40)], dtype=torch.float64)
    # keep ratios away from the clip kinks, where the loss is not differentiable
    offsets = [rng.choice([-1, 1]) * rng.uniform(0.02, 0.5) for _ in range(40)]
    offsets = [o if abs(math.exp(o) - 0.8) > 1e-3 and abs(math.exp(o) - 1.28) > 1e-3 else 0.05 for o in offsets]
    lp = (old + torch.tensor(offsets, dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([rng.gauss(0, 1) for _ in range(40)], dtype=torch.float64)
    mask = torch.ones(40, dtype=torch.float64)

    def objective(x):
        return clipped_surrogate(POLICY_RATIOS["ppo"](x, old, mask, [40]), adv, 0.2, 0.28, 3.0)["loss"].mean()

    assert torch.autograd.gradcheck(objective, (lp,), eps=1e-7, atol=1e-6)


def assert_grad_matches_finite_differences(grad, ref_objective, lp0, abs_tol: float, h: float = 1e-6) -> None:
    """grad (flat over the ragged rows of lp0) equals the central finite differences of ref_objective at lp0."""
    pos = 0
    for i, row in enumerate(lp0):
        for t in range(len(row)):
            up = [r[:] for r in lp0]
            down = [r[:] for r in lp0]
            up[i][t] += h
            down[i][t] -= h
            fd = (ref_objective(up) - ref_objective(down)) / (2 * h)
            assert grad[pos].item() == pytest.approx(fd, abs=abs_tol)
            pos += 1


def test_gspo_gradient_matches_the_sequence_objective():
    """With one advantage per sequence (GRPO's), the token-level trick's gradient equals the finite-difference
    gradient of the plain sequence objective mean_t f(exp(mean_u (lp_u - old_u)), A)."""
    rng = random.Random(9)
    lengths = [3, 5, 1]
    masks = [[1, 1, 1], [1, 0, 1, 1, 1], [1]]
    old = [[rng.gauss(-1, 0.3) for _ in range(n)] for n in lengths]
    lp0 = [[o + rng.gauss(0, 0.01) for o in row] for row in old]
    advs = [0.7, -1.3, 0.4]

    def ref_objective(lp):  # plain float64, per-sample token mean, sample mean
        total = 0.0
        for i, n in enumerate(lengths):
            m = masks[i]
            seq = sum((lp[i][t] - old[i][t]) * m[t] for t in range(n)) / sum(m)
            total += sum(ref_surrogate(math.exp(seq), advs[i], 0.2, 0.2, None)[0] * m[t] for t in range(n)) / sum(m)
        return total / len(lengths)

    x = flat(lp0).requires_grad_()
    log_ratio = POLICY_RATIOS["gspo"](x, flat(old), flat(masks), lengths)
    got = clipped_surrogate(log_ratio, flat([[a] * n for a, n in zip(advs, lengths, strict=True)]), 0.2, 0.2, None)
    got = got["loss"]
    loss = sum((c * m).sum() / m.sum() for c, m in zip(got.split(lengths), flat(masks).split(lengths), strict=True))
    (loss / len(lengths)).backward()
    assert (loss / len(lengths)).item() == pytest.approx(ref_objective(lp0), rel=1e-12)
    assert_grad_matches_finite_differences(x.grad, ref_objective, lp0, abs_tol=1e-7)


# ---------------------------------------------------------------- value loss
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_reference_and_finite_differences(clip):
    rng = random.Random(10)
    old = [rng.gauss(0, 1) for _ in range(50)]
    new = [o + rng.choice([-1, 1]) * rng.uniform(0.01, 0.6) for o in old]
    new = [v if clip is None or abs(abs(v - o) - clip) > 1e-3 else o for v, o in zip(new, old, strict=True)]
    ret = [rng.gauss(0, 1) for _ in range(50)]
    want, want_clip = [], []
    for v, o, g in zip(new, old, ret, strict=True):
        un = (v - g) ** 2
        if clip is None:
            want.append(0.5 * un)
            want_clip.append(0.0)
            continue
        cl = (o + min(max(v - o, -clip), clip) - g) ** 2
        want.append(0.5 * max(un, cl))
        want_clip.append(float(cl > un))
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    got = value_loss(t(new), t(old), t(ret), clip)
    assert got["loss"].tolist() == pytest.approx(want, abs=1e-12)
    assert got["clipfrac"].tolist() == want_clip
    x = t(new).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: value_loss(v, t(old), t(ret), clip)["loss"].sum(), (x,), eps=1e-7)


# ---------------------------------------------------------------- corrections
def corr_args(**kw):
    base = dict(
        use_tis=False,
        tis_clip=2.0,
        tis_clip_low=0.0,
        tis_level="token",
        use_mis=False,
        mis_level="token",
        mis_lower_bound=0.5,
        mis_upper_bound=2.0,
        mis_veto_threshold=None,
    )
    return SimpleNamespace(**(base | kw))


def ref_level(raw, mask, level):
    if level == "token":
        return raw
    s = sum(r * m for r, m in zip(raw, mask, strict=True))
    return [s] * len(raw) if level == "sequence" else [s / max(sum(mask), 1)] * len(raw)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["tis", "mis", "mis_veto", "both"])
def test_importance_weights_match_reference(mode, level):
    d = ragged_batch(11)
    rng = random.Random(12)
    rollout = [[o + rng.gauss(0, 0.4) for o in row] for row in d["old"]]
    rollout[3][0] = d["old"][3][0] + 12.0  # one catastrophic token: ratio e^-12
    kw = {}
    if mode in ("tis", "both"):
        kw |= dict(use_tis=True, tis_level=level, tis_clip=1.5, tis_clip_low=0.2)
    if mode in ("mis", "mis_veto", "both"):
        kw |= dict(use_mis=True, mis_level=level, mis_lower_bound=0.6, mis_upper_bound=1.8)
    if mode == "mis_veto":
        kw |= dict(mis_veto_threshold=1e-4)
    args = corr_args(**kw)
    t = lambda rows: [torch.tensor(r, dtype=torch.float64) for r in rows]  # noqa: E731
    weights, masks, metrics = importance_weights(
        args, train_log_probs=t(d["old"]), rollout_log_probs=t(rollout), loss_masks=t(d["masks"])
    )
    for i in range(len(rollout)):
        m = d["masks"][i]
        raw = [o - r for o, r in zip(d["old"][i], rollout[i], strict=True)]
        w_want = [1.0] * len(raw)
        if args.use_tis:
            w_want = [min(max(math.exp(x), 0.2), 1.5) for x in ref_level(raw, m, level)]
        keep = list(map(float, m))
        if args.use_mis:
            keep = [k * float(0.6 <= math.exp(x) <= 1.8) for k, x in zip(keep, ref_level(raw, m, level), strict=True)]
            vetoed = any(x < math.log(1e-4) and k for x, k in zip(raw, m, strict=True))
            if args.mis_veto_threshold is not None and vetoed:
                keep = [0.0] * len(keep)
        assert weights[i].tolist() == pytest.approx(w_want, rel=1e-12)
        assert masks[i].tolist() == keep
        assert metrics["mis_rejected_fraction"][i].tolist() == [max(0.0, a - b) for a, b in zip(m, keep, strict=True)]
        assert metrics["mismatch_k3_kl"][i].tolist() == pytest.approx([math.exp(x) - 1 - x for x in raw], rel=1e-12)
    if mode == "mis_veto":
        assert masks[3].sum() == 0  # the catastrophic token vetoes its whole sample


def test_dr_grpo_reducer_divides_by_a_constant():
    lengths = [3, 1, 4]
    masks = [torch.tensor(m, dtype=torch.float64) for m in ([1, 1, 0], [1], [0, 1, 1, 1])]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], dtype=torch.float64)
    args = SimpleNamespace(rollout_max_response_len=64)
    got = dr_grpo_pg_loss_reducer([10, 5, 9], lengths, masks, False, args=args)(x)
    assert float(got) == pytest.approx((1 + 2 + 4 + 6 + 7 + 8) / 64)
    per_token = dr_grpo_pg_loss_reducer([10, 5, 9], lengths, masks, True, args=args)(x)
    assert float(per_token) == pytest.approx(1 + 2 + 4 + 6 + 7 + 8)


# ---------------------------------------------------------------- the assembled micro-batch loss
def loss_args(**kw):
    base = dict(
        loss_type="policy_loss",
        advantage_estimator="grpo",
        eps_clip=0.2,
        eps_clip_high=0.28,
        eps_clip_c=None,
        entropy_coef=0.01,
        use_kl_loss=True,
        kl_loss_coef=0.1,
        kl_loss_type="k3",
        calculate_per_token_loss=False,
    )
    return SimpleNamespace(**(base | kw))


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("reducer", [False, True])
def test_micro_batch_loss_matches_reference(per_token, reducer):
    """pg (TIS-weighted, MIS-masked) - entropy_coef * entropy + kl_loss_coef * k3, per-sample token mean (or the
    per-token mean, or Dr. GRPO's constant), against a loop over samples and tokens."""
    from slime.trainer.loss import MicroBatch, micro_batch_loss

    d = ragged_batch(13)
    rng = random.Random(14)
    lengths, masks = d["lengths"], d["masks"]
    cols = {
        name: [[rng.gauss(mu, sd) for _ in range(n)] for n in lengths]
        for name, mu, sd in [
            ("lp", -1, 0.5),
            ("adv", 0, 1),
            ("ent", 2, 0.5),
            ("ref", -1, 0.5),
            ("w", 1, 0.2),
            ("keep", 0, 1),
        ]
    }
    cols["keep"] = [[float(x > -1.0) for x in row] for row in cols["keep"]]
    args = loss_args(calculate_per_token_loss=per_token)
    normalizer = float(sum(map(sum, masks))) if per_token else float(len(lengths))
    batch = MicroBatch(
        mask=flat(masks),
        lengths=lengths,
        normalizer=normalizer,
        advantages=flat(cols["adv"]),
        old_log_probs=flat(d["old"]),
        ref_log_probs=flat(cols["ref"]),
        is_weights=flat(cols["w"]),
        is_masks=flat(cols["keep"]),
    )
    if reducer:
        modified = [
            torch.tensor([k * m for k, m in zip(kr, mr, strict=True)], dtype=torch.float64)
            for kr, mr in zip(cols["keep"], masks, strict=True)
        ]
        batch.pg_reducer = dr_grpo_pg_loss_reducer(
            [], lengths, modified, per_token, args=SimpleNamespace(rollout_max_response_len=16)
        )
    out = {"log_probs": flat(cols["lp"]), "entropy": flat(cols["ent"])}
    loss, shares = micro_batch_loss(args, batch, out)

    pg_sum = ent_sum = kl_sum = 0.0
    for i, n in enumerate(lengths):
        pg_i = ent_i = kl_i = 0.0
        for t in range(n):
            m = masks[i][t]
            ratio = math.exp(cols["lp"][i][t] - d["old"][i][t])
            pg = ref_surrogate(ratio, cols["adv"][i][t], 0.2, 0.28, None)[0] * cols["w"][i][t] * cols["keep"][i][t]
            log_r = cols["ref"][i][t] - cols["lp"][i][t]
            pg_i += pg * m
            ent_i += cols["ent"][i][t] * m * cols["keep"][i][t]  # MIS-rejected tokens leave every term
            kl_i += (math.exp(log_r) - 1 - log_r) * m * cols["keep"][i][t]
        if reducer:
            pg_sum += pg_i if per_token else pg_i / 16
        else:
            pg_sum += pg_i if per_token else pg_i / max(sum(masks[i]), 1)
        ent_sum += ent_i if per_token else ent_i / max(sum(masks[i]), 1)
        kl_sum += kl_i if per_token else kl_i / max(sum(masks[i]), 1)
    want = (pg_sum - 0.01 * ent_sum + 0.1 * kl_sum) / normalizer
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert shares["pg_loss"] == pytest.approx(pg_sum / normalizer, rel=1e-10)
    assert shares["kl_loss"] == pytest.approx(kl_sum / normalizer, rel=1e-10)


@pytest.mark.parametrize("per_token", [False, True])
def test_gspo_with_tis_weights_and_mis_masks_matches_slime(per_token):
    """GSPO under per-token TIS weights w and MIS keep masks k, as slime defines it: s_i = exp(mean over the
    sample's loss tokens of (lp - old)); each token's loss f(s_i, A_i) * w_t * k_t; reduced like every loss term.
    Value and finite-difference gradient against that objective in plain float64."""
    from slime.trainer.loss import MicroBatch, micro_batch_loss

    rng = random.Random(21)
    lengths = [4, 6, 2]
    masks = [[1, 1, 0, 1], [1, 1, 1, 0, 1, 1], [1, 1]]
    old = [[rng.gauss(-1, 0.3) for _ in range(n)] for n in lengths]
    lp0 = [[o + rng.gauss(0, 0.05) for o in row] for row in old]
    w = [[rng.uniform(0.5, 1.5) for _ in range(n)] for n in lengths]
    keep = [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0]]
    advs = [0.7, -1.3, 0.4]
    normalizer = float(sum(map(sum, masks))) if per_token else float(len(lengths))
    args = loss_args(advantage_estimator="gspo", eps_clip=0.03, eps_clip_high=0.04, entropy_coef=0.0)
    args.use_kl_loss, args.calculate_per_token_loss = False, per_token

    def ref_objective(lp):
        total = 0.0
        for i, n in enumerate(lengths):
            m = masks[i]
            seq = sum((lp[i][t] - old[i][t]) * m[t] for t in range(n)) / sum(m)
            f = ref_surrogate(math.exp(seq), advs[i], 0.03, 0.04, None)[0]
            part = sum(f * w[i][t] * keep[i][t] * m[t] for t in range(n))
            total += part if per_token else part / sum(m)
        return total / normalizer

    x = flat(lp0).requires_grad_()
    batch = MicroBatch(
        mask=flat(masks),
        lengths=lengths,
        normalizer=normalizer,
        advantages=flat([[a] * n for a, n in zip(advs, lengths, strict=True)]),
        old_log_probs=flat(old),
        is_weights=flat(w),
        is_masks=flat(keep),
    )
    loss, _ = micro_batch_loss(args, batch, {"log_probs": x, "entropy": torch.zeros_like(x)})
    loss.backward()
    assert loss.item() == pytest.approx(ref_objective(lp0), rel=1e-12)
    assert_grad_matches_finite_differences(x.grad, ref_objective, lp0, abs_tol=1e-8)


def test_sft_loss_is_the_masked_nll():
    from slime.trainer.loss import MicroBatch, micro_batch_loss

    d = ragged_batch(15)
    batch = MicroBatch(mask=flat(d["masks"]), lengths=d["lengths"], normalizer=float(len(d["lengths"])))
    out = {"log_probs": flat(d["old"]), "entropy": flat(d["old"])}
    loss, _ = micro_batch_loss(loss_args(loss_type="sft_loss"), batch, out)
    want = 0.0
    for row, m in zip(d["old"], d["masks"], strict=True):
        want += -sum(x * k for x, k in zip(row, m, strict=True)) / max(sum(m), 1)
    assert loss.item() == pytest.approx(want / len(d["lengths"]), rel=1e-12)


def test_disable_rewards_normalization_uses_raw_rewards():
    d = ragged_batch(6)
    got, _ = run(d, rewards_normalization=False)
    assert_close(got, [[d["rewards"][i]] * n for i, n in enumerate(d["lengths"])])


def test_unbiased_kl_weights_the_kl_loss_by_the_importance_ratio():
    """--use-unbiased-kl: the KL loss is mean over tokens of (pi / pi_old) * k3, per sample then over samples."""
    from slime.trainer.loss import MicroBatch, micro_batch_loss

    d = ragged_batch(16)
    rng = random.Random(17)
    lp = [[rng.gauss(-1, 0.5) for _ in range(n)] for n in d["lengths"]]
    ref = [[rng.gauss(-1, 0.5) for _ in range(n)] for n in d["lengths"]]
    batch = MicroBatch(
        mask=flat(d["masks"]),
        lengths=d["lengths"],
        normalizer=float(len(d["lengths"])),
        advantages=flat([[0.0] * n for n in d["lengths"]]),
        old_log_probs=flat(d["old"]),
        ref_log_probs=flat(ref),
    )
    out = {"log_probs": flat(lp), "entropy": flat(lp)}
    args = loss_args(use_unbiased_kl=True)
    _, shares = micro_batch_loss(args, batch, out)
    want = 0.0
    for i, m in enumerate(d["masks"]):
        total = 0.0
        for t, k in enumerate(m):
            log_r = ref[i][t] - lp[i][t]
            total += math.exp(lp[i][t] - d["old"][i][t]) * (math.exp(log_r) - 1 - log_r) * k
        want += total / max(sum(m), 1)
    assert shares["kl_loss"] == pytest.approx(want / len(d["lengths"]), rel=1e-10)


def test_a_slime_signature_tis_hook_equals_the_same_correction_given_as_weights_and_masks():
    """slime's --custom-tis-function-path contract (per micro-batch, on the policy loss) gives the loss and metrics
    of the same weights and rejections applied as this project's is_weights / is_masks."""
    from slime.trainer.loss import MicroBatch, micro_batch_loss
    from tests.custom_hooks import slime_signature_tis

    d = ragged_batch(21)
    rng = random.Random(22)
    lengths = d["lengths"]
    lp = [[rng.gauss(-1, 0.5) for _ in range(n)] for n in lengths]
    rollout = [[o + rng.gauss(0, 0.5) for o in row] for row in d["old"]]
    common = dict(
        mask=flat(d["masks"]),
        lengths=lengths,
        normalizer=float(len(lengths)),
        advantages=flat([[rng.gauss(0, 1) for _ in range(n)] for n in lengths]),
        old_log_probs=flat(d["old"]),
        ref_log_probs=flat([[rng.gauss(-1, 0.5) for _ in range(n)] for n in lengths]),
        rollout_log_probs=flat(rollout),
    )
    ratio = torch.exp(flat(d["old"]) - flat(rollout))
    hooked = MicroBatch(**common, tis_hook=slime_signature_tis, total_lengths=[n + 3 for n in lengths])
    given = MicroBatch(**common, is_weights=ratio.clamp(0.0, 2.0), is_masks=(ratio <= 1.5).double())
    out = {"log_probs": flat(lp), "entropy": flat(lp)}
    args = loss_args()
    loss_a, shares_a = micro_batch_loss(args, hooked, out)
    loss_b, shares_b = micro_batch_loss(args, given, out)
    assert 0 < float((ratio > 1.5).double().mean()) < 1  # some tokens rejected, not all
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-12)
    for key in ("pg_loss", "entropy", "kl_loss", "pg_clipfrac"):
        assert shares_a[key] == pytest.approx(shares_b[key], rel=1e-12)
    want_tis = sum(
        sum(math.exp(o - r) * k for o, r, k in zip(d["old"][i], rollout[i], d["masks"][i], strict=True))
        / max(sum(d["masks"][i]), 1)
        for i in range(len(lengths))
    ) / len(lengths)
    assert shares_a["tis"] == pytest.approx(want_tis, rel=1e-10)  # metrics over every loss token
