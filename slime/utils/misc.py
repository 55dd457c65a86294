"""Small helpers on the public extension surface."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_function(path: str, flag: str | None = None) -> Callable[..., Any]:
    """Import `module.path:function` or `module.path.function` (nested attributes allowed after the colon).

    `flag` names the command-line flag the path came from, so a typo is reported against it.
    """
    where = f"{flag} {path!r}" if flag else repr(path)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{where}: expected 'module.path:function' or 'module.path.function'")
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"{where}: expected 'module.path:function' or 'module.path.function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # a syntax or runtime error in the module is as fatal as a missing one
        raise ImportError(f"{where}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(f"{where}: module {module_name!r} has no attribute {attr_path!r}") from exc
    if not callable(obj):
        raise TypeError(f"{where}: {attr_path!r} in {module_name!r} is not callable")
    return obj
