import random

import pytest
import torch

from slime.trainer.packing import forward_log_probs, response_positions, split_micro_batches


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


def test_response_positions_point_at_the_predicting_logits():
    # sequences of 5 and 3 tokens with 2 and 1 response tokens: tokens 3,4 and 7 are predicted by rows 2,3 and 6
    assert response_positions([5, 3], [2, 1], torch.device("cpu")).tolist() == [2, 3, 6]


def test_packed_log_probs_equal_one_sequence_at_a_time(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    rng = random.Random(1)
    seqs = [[rng.randrange(100, 40000) for _ in range(n)] for n in (7, 12, 3)]
    resp = [4, 5, 2]
    with torch.no_grad():
        packed, entropy = forward_log_probs(model, seqs, resp, temperature=0.7)
        for_each = []
        for s, r in zip(seqs, resp, strict=True):  # plain per-sequence reference, whole logits, no packing
            logits = model(torch.tensor([s])).logits[0].double() / 0.7
            lp = torch.log_softmax(logits, -1)
            for_each += [lp[j - 1, s[j]].item() for j in range(len(s) - r, len(s))]
    assert packed.shape == entropy.shape == (11,)
    assert torch.allclose(packed.double(), torch.tensor(for_each, dtype=torch.float64), atol=1e-5)
    assert torch.all(entropy > 0)
