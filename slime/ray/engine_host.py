"""Engines as Ray actors: each engine server is the child process of a small `EngineHost` actor, and Ray decides
where that actor runs (a bundle of the run's engine placement group, or the node of the training GPU it shares). So
engines live on any node of the cluster, and the rollout manager drives them by URL as before.

`RayEngine` is the manager-side handle: the same surface as a local `ServerProcess` (url, alive, log_tail, stop...),
every call to the actor bounded by a timeout. An engine dies with its actor (the server watches its parent), so a
lost node leaves no orphan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray

from slime.engine.launch import ServerProcess, launch_engine, wait_serving

CALL_TIMEOUT_S = 60.0  # an actor call that takes longer means its node is gone or stuck


@ray.remote(num_cpus=0)
class EngineHost:
    """Runs one engine server on the node Ray placed this actor on."""

    def __init__(self) -> None:
        self.server: ServerProcess | None = None

    def start(self, model_path: str, log_dir: str, reachable: bool, options: dict[str, Any]) -> dict[str, Any]:
        """Launch the server (without waiting for it to load). `reachable`: bind the node's address, so the router
        and the trainer on other nodes can reach it; else loopback only. Returns where it runs."""
        host = ray.util.get_node_ip_address() if reachable else "127.0.0.1"
        self.server = launch_engine(model_path, log_dir, host=host, wait=False, **options)
        return {
            "url": self.server.url,
            "log_path": str(self.server.log_path),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": self.server.proc.pid,
        }

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    def exit_note(self) -> str:
        return self.server.exit_note() if self.server is not None else "not started"

    def log_tail(self, chars: int) -> str:
        return self.server.log_tail(chars) if self.server is not None else "(not started)"

    def terminate(self) -> None:
        if self.server is not None:
            self.server.terminate()

    def stop(self, grace: float) -> None:
        if self.server is not None:
            self.server.stop(grace)


@dataclass
class RayEngine:
    """The rollout manager's handle on an engine hosted by an `EngineHost` actor."""

    name: str
    actor: Any
    url: str
    log_path: str  # on the engine's node
    node_id: str
    node_ip: str
    pid: int
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(
        cls,
        name: str,
        actor_options: dict[str, Any],
        model_path: str,
        log_dir: str,
        reachable: bool,
        options: dict[str, Any],
        timeout_s: float,
    ) -> RayEngine:
        """Create the actor where `actor_options` (resources, scheduling strategy) place it and launch the server
        there; TimeoutError naming the engine when Ray cannot place or start it within `timeout_s` seconds."""
        actor = EngineHost.options(**actor_options).remote()
        try:
            where = ray.get(actor.start.remote(model_path, log_dir, reachable, options), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            ray.kill(actor)
            raise TimeoutError(
                f"{name}: Ray did not start its host actor within {timeout_s:.0f}s (asked for {actor_options}); "
                f"cluster resources {ray.cluster_resources()}, available {ray.available_resources()}"
            ) from exc
        except ray.exceptions.RayError as exc:  # the launch itself failed there: say which engine, free the actor
            ray.kill(actor)
            cause = getattr(exc, "cause", None) or exc
            raise RuntimeError(f"{name}: could not be launched: {type(cause).__name__}: {cause}") from exc
        return cls(name, actor, **where)

    def _call(self, method: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout_s)

    def alive(self) -> bool:
        try:
            return bool(self._call("alive"))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):  # the actor or its node is gone
            return False

    def exit_note(self) -> str:
        try:
            return f"{self._call('exit_note')} on node {self.node_ip}"
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            return f"its host actor on node {self.node_ip} is gone ({type(exc).__name__})"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self._call("log_tail", chars)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return f"(the log {self.log_path} is on node {self.node_ip}, whose host actor is gone)"

    def wait_ready(self, path: str, timeout: float) -> None:
        wait_serving(self, f"{self.name} on node {self.node_ip}", path, timeout)

    def terminate(self) -> None:
        try:
            self.actor.terminate.remote()
        except ray.exceptions.RayError:
            pass

    def stop(self, grace: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `grace` seconds), then the actor."""
        try:
            self._call("stop", grace, timeout_s=grace + 15)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass  # the node is gone: the server died with its actor
        ray.kill(self.actor)


def multi_node() -> bool:
    """Whether the Ray cluster has more than one live node (then engines must listen on a reachable address)."""
    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1
