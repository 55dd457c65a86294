"""SGLang-compatible `sampling_params`: parsing, validation and the per-step sampler.

Logprob convention (SGLang's): the logprob of a sampled token is `log_softmax(logits / temperature)` taken before
top-k / top-p / min-p truncation, so the trainer reproduces it from the logits alone. A temperature below 1e-6 means
greedy decoding, whose logprobs are the plain `log_softmax(logits)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be a non-negative integer")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int):
            raise bad("top_k", "must be an integer (-1 for all)")
        if not isinstance(self.min_p, int | float) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of them")
        if not isinstance(self.stop_token_ids, list) or not all(isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids")

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
    temps = torch.tensor([1.0 if p.greedy else float(p.temperature) for p in params], dtype=torch.float32, device=dev)
    scaled = logits / temps[:, None]
    logprobs_full = torch.log_softmax(scaled, dim=-1)
    tokens = torch.empty(len(params), dtype=torch.long, device=dev)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        tokens[greedy] = scaled[greedy].argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        filtered = _truncate(scaled[sampled], logprobs_full[sampled], [params[i] for i in sampled])
        probs = torch.softmax(filtered, dim=-1)
        # argmax(p / E) with E ~ Exp(1) draws from p exactly, and is far cheaper than torch.multinomial on CPU
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for j, i in enumerate(sampled):
            if row_generators[i] is not None:
                noise[j].exponential_(generator=row_generators[i])
        tokens[sampled] = (probs / noise).argmax(dim=-1)
    return tokens, logprobs_full.gather(1, tokens[:, None])[:, 0]


def _truncate(scaled: torch.Tensor, logprobs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to temperature-scaled logits [b, V]; removed entries become -inf."""
    vocab = scaled.shape[-1]
    dev = scaled.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    top_p = torch.tensor([float(p.top_p) for p in params], device=dev)
    min_p = torch.tensor([float(p.min_p) for p in params], device=dev)
    if bool((top_k >= vocab).all() and (top_p >= 1).all() and (min_p <= 0).all()):
        return scaled
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    sorted_probs = sorted_lp.exp()
    rank = torch.arange(vocab, device=dev)[None, :]
    cum_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (rank >= top_k[:, None]) | (cum_before >= top_p[:, None])
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return scaled.masked_fill(mask, float("-inf"))
