"""SGLang-compatible `sampling_params`: parsing, validation and the per-step sampler.

Logprob convention (SGLang's): the logprob of a sampled token is `log_softmax(logits / temperature)` taken before
top-k / top-p / min-p truncation, so the trainer reproduces it from the logits alone. A temperature below 1e-6 means
greedy decoding, whose logprobs are the plain `log_softmax(logits)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

GREEDY_EPS = 1e-6

# Keys SGLang accepts that this engine does not implement: accepted only at their neutral value, so a request that
# relies on them fails loudly instead of being silently answered differently.
_NEUTRAL_ONLY = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "n": 1,
    "regex": None,
    "json_schema": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
    "stream_interval": None,
}


class SamplingParamsError(ValueError):
    """A bad `sampling_params` key or value; the HTTP server answers it with 400."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or any value < 1) means the whole vocabulary
    min_p: float = 0.0
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    @classmethod
    def from_dict(cls, raw: dict | None) -> SamplingParams:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        for key, value in list(raw.items()):
            if key in _NEUTRAL_ONLY:
                if value not in (None, _NEUTRAL_ONLY[key]):
                    raise SamplingParamsError(f"sampling_params.{key}={value!r} is not supported by this engine")
                raw.pop(key)
            elif key not in known:
                raise SamplingParamsError(f"unknown field sampling_params.{key}")
        for key in [k for k, v in raw.items() if v is None]:
            raw.pop(key)  # null means "default", as in SGLang
        if isinstance(raw.get("stop"), str):
            raw["stop"] = [raw["stop"]]
        params = cls(**raw)
        params._check()
        return params

    def _check(self) -> None:
        def bad(key: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(f"sampling_params.{key}={getattr(self, key)!r}: {why}")

        def integer(v: Any) -> bool:  # JSON true/false are not counts
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v: Any) -> bool:  # finite: NaN compares false with every bound and would pass them
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        if not integer(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be a non-negative integer")
        if not integer(self.min_new_tokens) or self.min_new_tokens < 0:
            raise bad("min_new_tokens", "must be a non-negative integer")
        if not number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not integer(self.top_k):
            raise bad("top_k", "must be an integer (-1 for all)")
        if not number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of them")
        if not isinstance(self.stop_token_ids, list) or not all(integer(t) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids")
        if self.sampling_seed is not None and not integer(self.sampling_seed):
            raise bad("sampling_seed", "must be an integer")
        for key in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def sample_next(
    logits: torch.Tensor,
    params: list[SamplingParams],
    row_generators: list[torch.Generator | None],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row.

    logits: [B, V] (any float dtype). `row_generators[i]` (a request's own seeded generator, or None) makes row i
    reproducible whatever else shares the batch; other rows draw from `generator`.
    Returns (tokens [B] int64, logprobs [B] float32), logprobs by the convention in the module docstring.
    """
    logits = logits.float()
    dev = logits.device
    temps = [1.0 if p.greedy else float(p.temperature) for p in params]
    scaled = logits if all(t == 1.0 for t in temps) else logits / torch.tensor(temps, device=dev)[:, None]
    logprobs_full = torch.log_softmax(scaled, dim=-1)
    tokens = torch.empty(len(params), dtype=torch.long, device=dev)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        tokens[greedy] = scaled[greedy].argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = slice(None) if len(sampled) == len(params) else sampled  # all rows: no copy
        lp = logprobs_full[rows]
        weights = lp.exp()  # unnormalised is fine for the inverse CDF; truncated entries become 0
        dropped = _truncated(lp, [params[i] for i in sampled])
        if dropped is not None:
            weights.masked_fill_(dropped, 0.0)
        tokens[rows] = _inverse_cdf(weights, [row_generators[i] for i in sampled], generator)
    return tokens, logprobs_full.gather(1, tokens[:, None])[:, 0]


def _inverse_cdf(
    weights: torch.Tensor, row_generators: list[torch.Generator | None], generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of non-negative weights [b, V] (zeros allowed, at least one positive per row), drawn with
    probability proportional to its weight: the first index whose cumulative weight exceeds a uniform draw over the
    row's total. Returns [b] int64.

    One random number per row: an exponential per vocabulary entry cost 128 ms per 64 x 49k CPU step; this takes
    8 ms. Two levels keep the cumulative sums small and float64: pick a bucket of 1,024 entries
    from the buckets' totals, then the entry inside it. Zero-weight entries are never picked."""
    b, vocab = weights.shape
    width = min(1024, vocab)
    full = vocab // width * width
    buckets = weights[:, :full].unflatten(-1, (full // width, width)).sum(-1)  # float32: relative error ~1e-7
    if full < vocab:
        buckets = torch.cat([buckets, weights[:, full:].sum(-1, keepdim=True)], dim=1)
    u = torch.rand(b, 1, dtype=torch.float64, generator=generator, device=weights.device)
    for j, g in enumerate(row_generators):
        if g is not None:
            u[j] = torch.rand((), dtype=torch.float64, generator=g)
    bucket, u = _search(buckets.double().cumsum(-1), u)
    index = bucket * width + torch.arange(width, device=weights.device)
    inside = weights.gather(1, index.clamp(max=vocab - 1)).double().masked_fill(index >= vocab, 0.0)
    return (bucket * width + _search(inside.cumsum(-1), u)[0])[:, 0]


def _search(cdf: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cdf [b, n] cumulative float64 weights, u [b, 1] in [0, 1): the entry k [b, 1] in which u * total falls (never
    a zero-weight one) and where inside it, as a fraction [b, 1] in [0, 1) of its weight (uniform again, so it can
    pick inside entry k when k is a bucket)."""
    total = cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the top
    k = torch.searchsorted(cdf, target, right=True)
    before = torch.where(k > 0, cdf.gather(1, (k - 1).clamp(min=0)), 0.0)
    return k, (target - before) / (cdf.gather(1, k) - before)


def _truncated(logprobs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor | None:
    """Entries of log-probs [b, V] that top-k, top-p or min-p remove (bool [b, V]); None when no row truncates."""
    vocab = logprobs.shape[-1]
    dev = logprobs.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    top_p = torch.tensor([float(p.top_p) for p in params], device=dev)
    min_p = torch.tensor([float(p.min_p) for p in params], device=dev)
    if bool((top_k >= vocab).all() and (top_p >= 1).all() and (min_p <= 0).all()):
        return None
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    sorted_probs = sorted_lp.exp()
    rank = torch.arange(vocab, device=dev)[None, :]
    cum_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (rank >= top_k[:, None]) | (cum_before >= top_p[:, None])
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    return torch.zeros_like(drop).scatter(1, order, drop)


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The in-graph sampler of the paged backend's CUDA decode step (temperature only, no host sync).
    logits [b, V] (model dtype), temperature [b], greedy [b] bool, noise [b, V] ~ Exp(1). Returns (logits [b, V]
    float32, tokens [b], logprobs [b] of log_softmax(logits / temperature))."""
    logits = logits.float()
    scaled = logits / temperature[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    # exponential race: argmax(p / E) with E ~ Exp(1) draws from p; in log space argmax(logp - log E)
    toks = torch.where(greedy, scaled.argmax(-1), (logprobs - noise.log()).argmax(-1))
    return logits, toks, logprobs.gather(1, toks[:, None])[:, 0]
