"""Launch the real `sglang-router` and register engine servers with it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from slime.engine.launch import ServerProcess, spawn
from slime.utils.http_utils import release_port, request_sync, reserve_port


def launch_router(
    log_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    policy: str = "cache_aware",
    request_timeout_s: int = 3600,
    startup_timeout: float = 60.0,
) -> ServerProcess:
    """Start `python -m sglang_router.launch_router` and wait until it answers. `port` 0: one reserved here."""
    own_port = not port
    port = port or reserve_port(host)
    metrics_port = reserve_port(host)
    cmd = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        host,
        "--port",
        str(port),
        "--policy",
        policy,
        "--request-timeout-secs",
        str(request_timeout_s),
        "--disable-circuit-breaker",
        "--balance-abs-threshold",
        "10",
        "--balance-rel-threshold",
        "1.2",
        "--log-level",
        "warn",
        # its metrics exporter otherwise binds a fixed port, so a second router on the host would crash
        "--prometheus-host",
        host,
        "--prometheus-port",
        str(metrics_port),
    ]
    try:
        router = spawn("router", cmd, f"http://{host}:{port}", log_dir, die_with_parent=True)
        router.wait_ready("/workers", startup_timeout)
    finally:
        release_port(host, metrics_port)
        if own_port:
            release_port(host, port)
    return router


def list_workers(router_url: str) -> list[dict]:
    status, body = request_sync("GET", f"{router_url}/workers", timeout=10)
    if status != 200:
        raise RuntimeError(f"GET {router_url}/workers -> HTTP {status}: {body[:500]}")
    return json.loads(body).get("workers", [])


def register_worker(router_url: str, worker_url: str, timeout: float = 60.0) -> None:
    """POST /workers, then wait until the router lists the worker (it adds workers in the background)."""
    status, body = request_sync("POST", f"{router_url}/workers", {"url": worker_url, "worker_type": "regular"})
    if status >= 400:
        raise RuntimeError(f"router {router_url} refused worker {worker_url}: HTTP {status}: {body[:500]}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w.get("url") == worker_url for w in list_workers(router_url)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"router {router_url} did not list worker {worker_url} within {timeout:.0f}s")


def remove_worker(router_url: str, worker_url: str) -> None:
    for w in list_workers(router_url):
        if w.get("url") == worker_url:
            request_sync("DELETE", f"{router_url}/workers/{w['id']}", timeout=10)
