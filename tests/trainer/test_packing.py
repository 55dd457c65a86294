import random

import pytest
import torch

from slime.trainer.attention import PACKED
from slime.trainer.packing import (
    balanced_partition,
    forward_log_probs,
    forward_values,
    pack,
    rank_shares,
    response_positions,
    split_micro_batches,
)


@pytest.mark.parametrize("max_tokens", [None, 10, 25, 1000])
def test_micro_batches_cover_every_sample_once_within_the_token_bound(max_tokens):
    rng = random.Random(0)
    lengths = [rng.randint(1, 12) for _ in range(37)] + [30]  # one sample longer than 25
    bins = split_micro_batches(lengths, 4, max_tokens)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    if max_tokens is None:
        assert [len(b) for b in bins] == [4] * 9 + [2]
    else:
        assert all(sum(lengths[i] for i in b) <= max_tokens or len(b) == 1 for b in bins)
        assert len(bins) <= 2 * sum(lengths) // max_tokens + 2  # first-fit: at most twice the optimum, roughly
    for b in bins:  # no padding: the packed row holds exactly the micro-batch's tokens
        ids, pos = pack([list(range(lengths[i])) for i in b], torch.device("cpu"))
        assert ids.shape == (1, sum(lengths[i] for i in b)) and pos[0].tolist().count(0) == len(b)


@pytest.mark.parametrize("world, round_robin_ratio", [(2, 1.06), (4, 1.48), (8, 2.73)])
def test_balance_data_evens_rank_tokens_on_skewed_lengths(world, round_robin_ratio):
    """64 samples with log-normal lengths (a few long responses, many short): the max/min token ratio across ranks
    falls from 1.06 / 1.48 / 2.73 (round-robin) to at most 1.01 on 2, 4 and 8 ranks, equal sample counts kept."""
    rng = random.Random(0)
    for _ in range([2, 4, 8].index(world) + 1):  # the same draws as the numbers in the docstring
        lengths = [int(rng.lognormvariate(5, 1)) + 20 for _ in range(64)]
    step = list(range(64))

    def ratio(shares):
        totals = [sum(lengths[i] for i in s) for s in shares]
        return max(totals) / min(totals)

    plain, balanced = rank_shares(step, lengths, world, False), rank_shares(step, lengths, world, True)
    assert ratio(plain) == pytest.approx(round_robin_ratio, abs=0.01)
    assert ratio(balanced) < 1.01
    assert sorted(i for s in balanced for i in s) == step and {len(s) for s in balanced} == {64 // world}


def test_balanced_partition_edge_cases():
    assert balanced_partition([5, 1, 1, 1], 2) in ([[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 3], [1, 2]])
    assert balanced_partition([], 3) == [[], [], []]
    parts = balanced_partition([7, 3, 3], 2)  # an odd count: sizes differ by one
    assert sorted(len(p) for p in parts) == [1, 2] and sorted(i for p in parts for i in p) == [0, 1, 2]


def test_response_positions_point_at_the_predicting_logits():
    # sequences of 5 and 3 tokens with 2 and 1 response tokens: tokens 3,4 and 7 are predicted by rows 2,3 and 6
    assert response_positions([5, 3], [2, 1], torch.device("cpu")).tolist() == [2, 3, 6]


@pytest.mark.parametrize("attention", ["sdpa", PACKED])
def test_packed_log_probs_equal_one_sequence_at_a_time(tiny_model_path, attention):
    """transformers' own masks for packed rows, and the trainer's packed attention (no mask, per-sample kernels)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation=attention)
    rng = random.Random(1)
    seqs = [[rng.randrange(100, 40000) for _ in range(n)] for n in (7, 12, 3)]
    resp = [4, 5, 2]
    with torch.no_grad():
        out = forward_log_probs(model, seqs, resp, temperature=0.7, keep_logits=True)
        packed, entropy = out["log_probs"], out["entropy"]
        for_each = []
        for s, r in zip(seqs, resp, strict=True):  # plain per-sequence reference, whole logits, no packing
            logits = model(torch.tensor([s])).logits[0].double() / 0.7  # one plain sequence: causal attention
            lp = torch.log_softmax(logits, -1)
            for_each += [lp[j - 1, s[j]].item() for j in range(len(s) - r, len(s))]
    assert packed.shape == entropy.shape == (11,)
    assert torch.allclose(packed.double(), torch.tensor(for_each, dtype=torch.float64), atol=1e-5)
    assert torch.all(entropy > 0)
    assert out["logits"].shape == (11, model.config.vocab_size)


def test_packed_values_equal_one_sequence_at_a_time(tiny_model_path):
    """The critic reads V(s_t) at the row before each response token, and packing does not leak across samples."""
    from transformers import AutoModel

    from slime.trainer.models import ValueModel

    critic = ValueModel(AutoModel.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation=PACKED))
    torch.nn.init.normal_(critic.value_head.weight)  # a zero head (the initial state) would hide any mistake
    rng = random.Random(2)
    seqs = [[rng.randrange(100, 40000) for _ in range(n)] for n in (5, 9, 2)]
    resp = [3, 4, 1]
    with torch.no_grad():
        packed = forward_values(critic, seqs, resp)
        want = []
        for s, r in zip(seqs, resp, strict=True):
            v = critic(torch.tensor([s]), torch.arange(len(s))[None])[0]
            want += [v[j - 1].item() for j in range(len(s) - r, len(s))]
    assert torch.allclose(packed.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("estimator", ["ppo", "gspo"])
def test_loss_and_gradients_do_not_depend_on_the_micro_batch_split(tiny_model_path, estimator, per_token):
    """One global batch, split into micro-batches four ways (fixed sizes and token-packed): the summed loss shares
    agree to 1e-6 relative, the accumulated gradients of the policy and the critic to 1e-5 of the largest entry
    (float32 model: the split changes the summation order)."""
    from types import SimpleNamespace

    from transformers import AutoModel, AutoModelForCausalLM

    from slime.trainer.loss import MicroBatch, critic_loss, micro_batch_loss
    from slime.trainer.models import ValueModel

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation=PACKED)
    critic = ValueModel(AutoModel.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation=PACKED))
    torch.nn.init.normal_(critic.value_head.weight, std=0.1)
    rng = random.Random(3)
    lengths = [9, 4, 12, 6, 7, 3]
    resp = [5, 1, 8, 2, 4, 2]
    seqs = [[rng.randrange(100, 40000) for _ in range(n)] for n in lengths]
    masks = [[float(rng.random() > 0.2) for _ in range(r)] for r in resp]
    masks[1] = [0.0]  # fully masked sample
    per_sample = lambda: [torch.tensor([rng.gauss(0, 1) for _ in range(r)]) for r in resp]  # noqa: E731
    advantages, noise, returns, old_values = per_sample(), per_sample(), per_sample(), per_sample()
    with torch.no_grad():
        lp = forward_log_probs(model, seqs, resp, 1.0)["log_probs"].split(resp)
    old = [x + 0.05 * e for x, e in zip(lp, noise, strict=True)]
    args = SimpleNamespace(
        loss_type="policy_loss",
        advantage_estimator=estimator,
        eps_clip=0.2,
        eps_clip_high=0.2,
        eps_clip_c=3.0,
        entropy_coef=0.01,
        use_kl_loss=True,
        kl_loss_coef=0.1,
        kl_loss_type="k2",
        calculate_per_token_loss=per_token,
        value_clip=0.2,
    )
    normalizer = sum(map(sum, masks)) if per_token else float(len(resp))

    def run(splits):
        model.zero_grad()
        critic.zero_grad()
        total = 0.0
        for mb in splits:
            cat = lambda col: torch.cat([torch.as_tensor(col[i]) for i in mb])  # noqa: E731,B023
            batch = MicroBatch(
                mask=cat(masks),
                lengths=[resp[i] for i in mb],
                normalizer=normalizer,
                advantages=cat(advantages),
                old_log_probs=cat(old),
                ref_log_probs=cat(lp),
                returns=cat(returns),
                old_values=cat(old_values),
            )
            tokens, rlens = [seqs[i] for i in mb], [resp[i] for i in mb]
            loss, _ = micro_batch_loss(args, batch, forward_log_probs(model, tokens, rlens, 1.0, True))
            closs, _ = critic_loss(args, batch, forward_values(critic, tokens, rlens))
            (loss + closs).backward()
            total += loss.item() + closs.item()
        grads = [p.grad.clone() for p in [*model.parameters(), *critic.parameters()] if p.grad is not None]
        return total, torch.cat([g.flatten() for g in grads])

    ref_loss, ref_grad = run([[0, 1, 2, 3, 4, 5]])
    max_tokens = 20
    packed = [[lengths.index(n) for n in group] for group in ([12], [9, 7], [6, 4, 3])]
    assert all(sum(lengths[i] for i in mb) <= max_tokens for mb in packed)
    for splits in ([[i] for i in range(6)], [[0, 1], [2, 3], [4, 5]], [[0, 1, 2], [3, 4, 5]], packed):
        loss, grad = run(splits)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert (grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()
