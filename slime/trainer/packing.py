"""How a rollout is laid out for training: optimizer steps split over ranks (optionally token-balanced), packed
micro-batches (no padding), and the response log-probabilities computed over them."""

from __future__ import annotations

import bisect
import heapq
import itertools

import torch

from slime.trainer.attention import PACKED, packed_kwargs
from slime.trainer.log_probs import token_log_probs
from slime.utils.types import TrainBatch


def split_micro_batches(lengths: list[int], micro_batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Group sample indices into micro-batches.

    Fixed size: consecutive groups of `micro_batch_size`. Dynamic (`max_tokens` set): first-fit of the samples,
    longest first, into as few micro-batches of at most `max_tokens` tokens as that finds; a longer sample gets a
    micro-batch of its own.
    """
    if max_tokens is None:
        return [
            list(range(i, min(i + micro_batch_size, len(lengths)))) for i in range(0, len(lengths), micro_batch_size)
        ]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def balanced_partition(lengths: list[int], k: int) -> list[list[int]]:
    """Indices of `lengths` in `k` parts of equal count (within one) with even token totals: the balanced largest
    differencing method (Karmarkar-Karp) — sorted longest first, each run of k items starts as a partition of k
    one-item sets, and the two partitions with the widest spread are merged repeatedly, the heaviest set of one with
    the lightest of the other — then single swaps between the heaviest and lightest parts."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    order += [-1] * (-len(order) % k)  # padding items of length 0 (dropped below) keep the counts equal
    tie = itertools.count()
    heap = []
    for c in range(0, len(order), k):
        sets = sorted(([lengths[i] if i >= 0 else 0, [i]] for i in order[c : c + k]), key=lambda x: -x[0])
        heapq.heappush(heap, (-(sets[0][0] - sets[-1][0]), next(tie), sets))
    while len(heap) > 1:
        a, b = heapq.heappop(heap)[2], heapq.heappop(heap)[2]
        merged = sorted(([x[0] + y[0], x[1] + y[1]] for x, y in zip(a, reversed(b), strict=True)), key=lambda x: -x[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next(tie), merged))
    sets = heap[0][2] if heap else [[0, []] for _ in range(k)]
    return _swap_refine([[i for i in items if i >= 0] for _, items in sets], lengths)


def _swap_refine(parts: list[list[int]], lengths: list[int], rounds: int = 200) -> list[list[int]]:
    """Swap one sample between the heaviest and the lightest part while that narrows their gap (the differencing
    method pairs samples rigidly; one swap often halves what it leaves). Counts never change."""
    for _ in range(rounds):
        totals = [sum(lengths[i] for i in p) for p in parts]
        hi, lo = totals.index(max(totals)), totals.index(min(totals))
        gap = totals[hi] - totals[lo]
        light = sorted(parts[lo], key=lambda j: lengths[j])
        light_lengths = [lengths[j] for j in light]
        best = (gap, -1, -1)
        for i in parts[hi]:
            pos = bisect.bisect_left(light_lengths, lengths[i] - gap / 2)
            for q in (pos - 1, pos):
                if 0 <= q < len(light) and 0 < lengths[i] - light_lengths[q] < gap:
                    best = min(best, (abs(gap - 2 * (lengths[i] - light_lengths[q])), i, light[q]))
        if best[1] < 0:
            break
        _, i, j = best
        parts[hi][parts[hi].index(i)], parts[lo][parts[lo].index(j)] = j, i
    return [sorted(p) for p in parts]


def rank_shares(step: list[int], lengths: list[int], world: int, balance: bool) -> list[list[int]]:
    """The sample indices of one optimizer step on each of `world` ranks: round-robin, or token-balanced
    (`--balance-data`). Either way every rank gets len(step) / world samples."""
    if not balance:
        return [step[r::world] for r in range(world)]
    return [[step[j] for j in part] for part in balanced_partition([lengths[i] for i in step], world)]


def pack(token_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate sequences into one row: input_ids [1, T] and position_ids [1, T] restarting at 0 per sequence
    (transformers reads the restarts as sequence boundaries and masks attention between them)."""
    ids = torch.tensor([t for seq in token_lists for t in seq], dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(len(seq), device=device) for seq in token_lists])
    return ids[None], pos[None]


def response_positions(seq_lengths: list[int], response_lengths: list[int], device: torch.device) -> torch.Tensor:
    """Indices into the packed row of the logits that predict each response token: [R], R = sum(response_lengths).
    Token j of a sequence is predicted by the logits at j - 1."""
    starts, out = 0, []
    for n, r in zip(seq_lengths, response_lengths, strict=True):
        out.append(torch.arange(starts + n - r - 1, starts + n - 1, device=device))
        starts += n
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=device)


def forward_log_probs(
    model: torch.nn.Module,
    token_lists: list[list[int]],
    response_lengths: list[int],
    temperature: float,
    entropy_grad: bool = False,
    keep_logits: bool = False,
    entropy: bool = True,
) -> dict[str, torch.Tensor]:
    """Log-probabilities of every response token under `model`, as the engine computes them:
    log_softmax(logits / temperature). Returns log_probs [R], with `entropy` the entropy [R] of that distribution
    (detached unless `entropy_grad`) and, with `keep_logits`, the raw logits [R, V]. Only the rows predicting response
    tokens go through the LM head, and no float32 [R, V] tensor is kept for backward (`token_log_probs`)."""
    device = next(model.parameters()).device
    ids, pos = pack(token_lists, device)
    rows = response_positions([len(t) for t in token_lists], response_lengths, device)
    logits = model(
        input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=rows, **_attention_kwargs(model, token_lists)
    ).logits.squeeze(0)  # squeeze, not [0]: select's backward zero-fills a full [1, R, V] gradient
    log_probs, ent = token_log_probs(logits, ids[0, rows + 1], temperature, entropy_grad, entropy)
    out = {"log_probs": log_probs} | ({"entropy": ent} if ent is not None else {})
    return out | ({"logits": logits.float()} if keep_logits else {})


def forward_values(critic: torch.nn.Module, token_lists: list[list[int]], response_lengths: list[int]) -> torch.Tensor:
    """The critic's value V(s_t) of the state before each response token (the same rows that predict it): [R]."""
    device = next(critic.parameters()).device
    ids, pos = pack(token_lists, device)
    rows = response_positions([len(t) for t in token_lists], response_lengths, device)
    return critic(input_ids=ids, position_ids=pos, **_attention_kwargs(critic, token_lists))[0, rows].float()


def _attention_kwargs(model: torch.nn.Module, token_lists: list[list[int]]) -> dict:
    """The sample boundaries for packed attention, when the model runs it (see slime.trainer.attention)."""
    config = getattr(model, "config", None) or model.backbone.config
    if getattr(config, "_attn_implementation", None) != PACKED:
        return {}
    return packed_kwargs([len(t) for t in token_lists], next(model.parameters()).device)


def trajectory_steps(
    data: TrainBatch, global_batch_size: int, loss_masks: list | None = None
) -> tuple[list[list[int]], list[float] | None]:
    """The optimizer steps of one rollout: sample indices per step, `global_batch_size` trajectories each (a
    trajectory is one sample, or the samples sharing a `Sample.rollout_id`), and, when some trajectory has several
    samples, each sample's loss denominator: its trajectory's loss-token count (over `loss_masks`, default the
    batch's), so the trajectory counts once."""
    loss_masks = data.loss_masks if loss_masks is None else loss_masks
    trajectory = data.trajectories or list(range(len(data)))
    members: dict[int, list[int]] = {}
    for i, t in enumerate(trajectory):
        members.setdefault(t, []).append(i)
    order = list(members)
    if len(order) % global_batch_size:
        raise ValueError(
            f"the rollout has {len(order)} trajectories, not a multiple of --global-batch-size {global_batch_size}"
        )
    steps = [
        [i for t in order[s : s + global_batch_size] for i in members[t]]
        for s in range(0, len(order), global_batch_size)
    ]
    if len(order) == len(trajectory):
        return steps, None
    tokens = {t: float(sum(float(sum(loss_masks[i])) for i in idx)) for t, idx in members.items()}
    return steps, [tokens[t] for t in trajectory]
