"""Packed micro-batches (no padding) and the response log-probabilities computed over them."""

from __future__ import annotations

import torch

from slime.algorithms.losses import entropy_from_log_probs


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
) -> dict[str, torch.Tensor]:
    """Log-probabilities of every response token under `model`, as the engine computes them:
    log_softmax(logits / temperature). Returns log_probs [R], the entropy [R] of that distribution (detached
    unless `entropy_grad`) and, with `keep_logits`, the raw logits [R, V]. Only the rows predicting response
    tokens go through the LM head."""
    device = next(model.parameters()).device
    ids, pos = pack(token_lists, device)
    rows = response_positions([len(t) for t in token_lists], response_lengths, device)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=rows).logits[0].float()
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    out = {
        "log_probs": log_p.gather(-1, ids[0, rows + 1][:, None])[:, 0],
        "entropy": entropy_from_log_probs(log_p if entropy_grad else log_p.detach()),
    }
    return out | ({"logits": logits} if keep_logits else {})


def forward_values(critic: torch.nn.Module, token_lists: list[list[int]], response_lengths: list[int]) -> torch.Tensor:
    """The critic's value V(s_t) of the state before each response token (the same rows that predict it): [R]."""
    device = next(critic.parameters()).device
    ids, pos = pack(token_lists, device)
    rows = response_positions([len(t) for t in token_lists], response_lengths, device)
    return critic(input_ids=ids, position_ids=pos)[0, rows].float()
