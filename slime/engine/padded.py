"""The padded backend: each running request is a row of one transformers DynamicCache.

A prefill runs the admitted prompts left-padded, then merges their cache into the running batch by padding both to
the same width; finished rows are cut out and columns that became padding for every row are dropped. Simple and
model-agnostic (any causal LM transformers can run with SDPA), but each merge and step copies the whole cache, so it
is the fallback behind `slime.engine.paged`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from slime.engine.embedded import EmbeddedEngine, Request


class PaddedEngine(EmbeddedEngine):
    backend = "padded"

    def _setup(self) -> None:
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 for real cache entries
        self._next_input: torch.Tensor | None = None  # [B] last sampled token, not yet in the cache
        self._positions: torch.Tensor | None = None  # [B] position id of that token

    def _iteration(self) -> None:
        self._admit()
        if self._rows:
            self._decode_step()

    def _drop_all(self) -> None:
        self._cache, self._mask = None, None

    def _free_kv(self) -> None:
        self._cache, self._mask, self._next_input = None, None, None

    def _admit(self) -> None:
        batch: list[Request] = []
        tokens = 0
        for r in self._admissible():
            nxt = len(r.input_ids) + len(r.output_ids)
            full = len(self._rows) + len(batch) >= self.max_running_requests
            if full or (batch and tokens + nxt > self.max_prefill_tokens):
                break
            batch.append(r)
            tokens += nxt
        if not batch:
            return
        with self._cv:
            for r in batch:
                self._waiting.remove(r)
        self._stepping = batch
        # a request retried after a failed step (see EmbeddedEngine._quarantine) recomputes its output so far
        seqs = [r.input_ids + r.output_ids for r in batch]
        width = max(len(q) for q in seqs)
        pad = self.eos_ids[0] if self.eos_ids else 0
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1
        )
        new_pos = mask.sum(-1)
        keep = self._sample_and_check(batch, out.logits[:, -1], new_pos.tolist())
        if not keep:
            return
        sel = torch.tensor(keep, device=self.device)
        _select_cache(cache, sel)
        self._merge(
            [batch[i] for i in keep],
            cache,
            mask[sel],
            torch.tensor([batch[i].output_ids[-1] for i in keep], device=self.device),
            new_pos[sel],
        )

    def _decode_step(self) -> None:
        ones = torch.ones(len(self._rows), 1, dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        out = self.model(
            input_ids=self._next_input[:, None],
            attention_mask=self._mask,
            position_ids=self._positions[:, None],
            past_key_values=self._cache,
        )
        self._positions = self._positions + 1
        rows = self._rows
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        keep = self._sample_and_check(rows, out.logits[:, -1], self._positions.tolist())
        self._next_input = torch.tensor([r.output_ids[-1] for r in rows], device=self.device)
        self._select_rows(keep)

    def _merge(
        self,
        reqs: list[Request],
        cache: DynamicCache,
        mask: torch.Tensor,
        next_input: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = reqs, cache, mask
            self._next_input, self._positions = next_input, positions
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)])
            old.values = torch.cat([_left_pad(old.values, width, 2), _left_pad(new.values, width, 2)])
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)])
        self._rows = self._rows + reqs
        self._next_input = torch.cat([self._next_input, next_input])
        self._positions = torch.cat([self._positions, positions])

    def _select_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._next_input, self._positions = [], None, None, None, None
            if self.device.type == "cuda":  # idle: give the cache's memory back, a trainer may share this GPU
                torch.cuda.empty_cache()
            return
        sel = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        _select_cache(self._cache, sel)
        self._mask, self._next_input, self._positions = self._mask[sel], self._next_input[sel], self._positions[sel]
        # drop cache columns that are padding for every remaining row
        lead = int((self._mask.sum(0) == 0).long().cumprod(0).sum())
        if lead:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _select_cache(cache: DynamicCache, sel: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[sel], layer.values[sel]
