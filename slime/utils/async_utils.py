"""Run coroutines from synchronous code on one long-lived event loop (so HTTP sessions are reused)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's shared event loop (started on first use, in a daemon thread)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="slime-async", daemon=True).start()
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the shared background loop and wait for its result (TimeoutError after `timeout` seconds)."""
    future = asyncio.run_coroutine_threadsafe(coro, background_loop())
    return future.result(timeout)
