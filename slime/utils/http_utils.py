"""Async HTTP helpers used by rollout code and custom generate functions (public import path).

`post` / `get` return the decoded JSON body (or the text when it is not JSON). Connection failures and 5xx answers
are retried with backoff; a 4xx answer raises at once with the server's message. Every call has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import aiohttp
import orjson

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 600.0
_sessions: dict[int, aiohttp.ClientSession] = {}


class HTTPError(RuntimeError):
    def __init__(self, method: str, url: str, status: int, body: str):
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:1000]}")
        self.status, self.body = status, body


def dumps_answer(obj: Any) -> bytes:
    """JSON bytes of a server's answer. orjson: a rollout's answers carry a [log-prob, id, text] triple per generated
    token, and the standard library takes ~15x longer to write them, time an engine's server shares with the engine
    thread. orjson writes NaN and infinities as null (where the client's reading fails loudly), so requests, whose
    values the user chose, go through `json`; what orjson cannot write at all (non-str keys) does too."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        return json.dumps(obj).encode()


def loads(body: bytes | str) -> Any:
    """The value of JSON `body` (orjson reads a long answer ~2x faster than `json`); NaN / Infinity, which orjson
    refuses and Python's json writes, are read too."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(id(loop))
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        session = aiohttp.ClientSession(connector=connector, trust_env=False)
        _sessions[id(loop)] = session
    return session


async def _request(method: str, url: str, payload: Any, max_retries: int, timeout: float, headers: dict | None) -> Any:
    data = None
    if payload is not None:
        data, headers = json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
    delay = 0.2
    for attempt in range(max_retries + 1):
        try:
            async with _session().request(
                method, url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise HTTPError(method, url, resp.status, body.decode(errors="replace"))
                if not body.strip():
                    return None
                try:
                    return loads(body)
                except ValueError:
                    return body.decode(errors="replace")
        except HTTPError as exc:
            if exc.status < 500 or attempt >= max_retries:
                raise
            last: Exception = exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            last = exc
        except TimeoutError as exc:
            raise TimeoutError(f"{method} {url}: no answer within {timeout:.0f}s") from exc
        if attempt >= max_retries:
            break
        logger.debug("%s %s failed (%s); retry %d/%d in %.1fs", method, url, last, attempt + 1, max_retries, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
    raise ConnectionError(f"{method} {url} failed after {max_retries + 1} attempts: {last}")


async def post(
    url: str,
    payload: Any = None,
    max_retries: int = 60,
    timeout: float = DEFAULT_TIMEOUT_S,
    headers: dict | None = None,
) -> Any:
    return await _request("POST", url, payload, max_retries, timeout, headers)


async def get(url: str, max_retries: int = 60, timeout: float = DEFAULT_TIMEOUT_S, headers: dict | None = None) -> Any:
    return await _request("GET", url, None, max_retries, timeout, headers)


async def close_sessions() -> None:
    for session in list(_sessions.values()):
        await session.close()
    _sessions.clear()


def request_sync(method: str, url: str, payload: Any = None, timeout: float = 30.0) -> tuple[int, str]:
    """Blocking request for control-plane code outside an event loop. Returns (status, body text); never raises on
    an HTTP status, raises ConnectionError (naming the URL) when nothing answers in `timeout` seconds.

    Connections are kept alive, one per server and thread: a weight sync makes several calls per engine, and a
    fresh TCP connection and request object for each cost more than the call itself on loopback. A kept connection
    the server has meanwhile closed is replaced once, before any answer was read."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{method} {url}: only http:// URLs are supported")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    body = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conns = _thread_connections.__dict__.setdefault("by_server", {})
    for attempt in (0, 1):
        conn = conns.get(parts.netloc)
        reused = conn is not None
        if conn is None:
            conn = conns[parts.netloc] = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        try:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace")
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            conn.close()
            conns.pop(parts.netloc, None)
            if reused and attempt == 0:
                continue  # the server closed an idle kept connection: nothing was answered, try a fresh one
            raise ConnectionError(f"{method} {url}: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, timed out, a malformed answer
            conn.close()
            conns.pop(parts.netloc, None)
            raise ConnectionError(f"{method} {url}: {exc}") from exc
        if resp.will_close:
            conn.close()
            conns.pop(parts.netloc, None)
        return resp.status, text
    raise AssertionError("unreachable")


_thread_connections = threading.local()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now. Only for a port nothing will listen on: a server's port comes from `reserve_port` or
    from a socket bound before the server starts, since another process can take this one before the bind."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_RESERVED: dict[tuple[str, int], object] = {}


def reserve_port(host: str = "127.0.0.1") -> int:
    """A port the OS picks and this process keeps bound (SO_REUSEADDR, not listening) until `release_port`: no other
    bind to port 0 and no outgoing connection gets it meanwhile, while the server meant for it (any that binds with
    SO_REUSEADDR, as the router and aiohttp do) can still listen there. For a port that must be known before its
    server starts, e.g. the router's, which every process of a run reads from the flags."""
    import socket

    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    port = s.getsockname()[1]
    _RESERVED[(host, port)] = s
    return port


def release_port(host: str, port: int) -> None:
    """Drop the reservation `reserve_port` made (a no-op for a port this process did not reserve)."""
    s = _RESERVED.pop((host, port), None)
    if s is not None:
        s.close()
