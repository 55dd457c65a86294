"""Tokenizer loading (public import path), cached per checkpoint."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str, trust_remote_code: bool = True) -> Any:
    from transformers import AutoTokenizer

    from slime.hub.provision import resolve_checkpoint

    return AutoTokenizer.from_pretrained(resolve_checkpoint(name_or_path), trust_remote_code=trust_remote_code)
