"""Tokenizer loading (public import path), cached per checkpoint."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str, trust_remote_code: bool = True) -> Any:
    from transformers import AutoTokenizer

    from slime.hub.provision import resolve_checkpoint

    return AutoTokenizer.from_pretrained(resolve_checkpoint(name_or_path), trust_remote_code=trust_remote_code)


@lru_cache(maxsize=8)
def load_processor(name_or_path: str, trust_remote_code: bool = True) -> Any:
    """The checkpoint's multimodal processor, or None for a text-only model (no preprocessor_config.json)."""
    from pathlib import Path

    from slime.hub.provision import resolve_checkpoint

    path = resolve_checkpoint(name_or_path)
    if not (Path(path) / "preprocessor_config.json").exists():
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
