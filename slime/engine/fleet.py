"""The engines of a run and the router in front of them: launch, registration, health checks, restarts and the
memory calls of colocated training. The rollout manager owns one fleet; engine backends plug in here.

Engines run as Ray actors (slime.ray.engine_host), so they can live on any node:
- on GPUs of their own (--rollout-num-gpus) or on CPU, engine i runs in bundle i of the fleet's placement group
  (GPU bundles packed onto few nodes; CPU engines spread over the nodes), and a restarted engine in the same bundle;
- sharing the training GPUs, engine i runs on the node of the i-th training GPU with that GPU as
  CUDA_VISIBLE_DEVICES.
On a cluster of several nodes engines listen on their node's address, else on loopback.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from slime.engine.launch import ExternalEngine, ServerProcess
from slime.engine.options import train_values
from slime.ray.engine_host import RayEngine, multi_node
from slime.router.router import launch_router, register_worker, remove_worker
from slime.utils.http_utils import request_sync

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    """Where the run's generation is served: facts known only once the servers run, kept out of the settled
    configuration."""

    router_url: str
    engine_urls: list[str]


PLACEMENT_TIMEOUT_S = 300.0  # Ray placing the engines' bundles (and each engine's host actor)


class EngineFleet:
    def __init__(self, args: Any, shared_gpus: list[tuple[str, str]] | None = None):
        """Start `args.rollout_num_engines` engines and, unless the flags name a running one, the router at the
        settled address; returns while they boot (`wait_ready` waits until every engine serves and is
        registered). `shared_gpus[i]`: (Ray node id, GPU id) of the training GPU engine i shares."""
        self.args = args
        self.shared_gpus = shared_gpus
        self.log_dir = os.path.join(args.output_dir, "server_logs")
        self.engines: list[RayEngine | ExternalEngine] = []
        self.pg: PlacementGroup | None = None
        self.router: ServerProcess | None = None
        self.router_url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
        self.on_restart: Callable[[str, list[str]], None] | None = None  # gives a restarted engine the weights
        self.restarts: list[float] = []  # seconds each engine restart took
        self._monitor_error: BaseException | None = None
        try:
            if args.rollout_external_engine_addrs:
                self.engines = [
                    ExternalEngine(f"external-engine-{i}", url)
                    for i, url in enumerate(args.rollout_external_engine_addrs)
                ]
            else:
                self.pg = self._placement_group()
                self.engines = [self._launch(i, wait=False) for i in range(args.rollout_num_engines)]
                self._record_placement()
            if args.launch_router:
                self.router = launch_router(
                    self.log_dir, args.sglang_router_ip, args.sglang_router_port, policy=args.router_policy
                )
        except BaseException:
            self.shutdown()
            raise

    def wait_ready(self) -> None:
        """Wait until every engine serves, then register it with the router; stops everything on failure."""
        try:
            for e in self.engines:
                e.wait_ready("/health", timeout=600)
                register_worker(self.router_url, e.url)
            if self.engines:
                _warn_backend_fallback(self.engines[0].url)
        except BaseException:
            self.shutdown()
            raise

    def _placement_group(self) -> PlacementGroup | None:
        """One bundle per engine unless engines share the training GPUs (they follow the trainer's ranks)."""
        a = self.args
        if self.shared_gpus is not None:
            if len(self.shared_gpus) < a.rollout_num_engines:
                raise RuntimeError(f"{a.rollout_num_engines} engines share the training GPUs, got {self.shared_gpus}")
            return None
        if a.rollout_device == "cuda":
            bundles, strategy = [{"GPU": float(a.rollout_num_gpus_per_engine)}] * a.rollout_num_engines, "PACK"
        else:  # a token CPU share: engine threads are settled by the flags, Ray only decides the node
            bundles, strategy = [{"CPU": 0.01}] * a.rollout_num_engines, "SPREAD"
        pg = placement_group(bundles, strategy=strategy)
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as exc:
            remove_placement_group(pg)
            raise TimeoutError(
                f"Ray could not place {a.rollout_num_engines} engine bundle(s) {bundles[0]} within "
                f"{PLACEMENT_TIMEOUT_S:.0f}s; cluster resources {ray.cluster_resources()}, available "
                f"{ray.available_resources()}"
            ) from exc
        return pg

    def _launch(self, index: int, wait: bool, restart: int = 0) -> RayEngine:
        a = self.args
        options = dict(
            index=index,
            seed=a.seed,
            restart=restart,
            device=a.rollout_device,
            rollout_backend=a.rollout_backend,
            tp_size=a.rollout_num_gpus_per_engine if a.rollout_device == "cuda" else 1,
            enable_memory_saver=bool(a.offload_rollout),  # SGLang frees memory on request only with it
            **train_values(a),
        )
        if self.shared_gpus is not None:
            node, options["gpu"] = self.shared_gpus[index]
            placement = {"num_gpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        else:
            gpus = a.rollout_num_gpus_per_engine if a.rollout_device == "cuda" else 0
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index)
            placement = {"num_gpus": gpus, "scheduling_strategy": strategy}  # Ray sets CUDA_VISIBLE_DEVICES
        name = f"engine-{index}" + (f"-restart{restart}" if restart else "")
        engine = RayEngine.start(
            name, placement, a.hf_checkpoint, self.log_dir, multi_node(), options, timeout_s=PLACEMENT_TIMEOUT_S
        )
        if wait:
            engine.wait_ready("/health", 600)
        return engine

    def _record_placement(self) -> None:
        """Where each engine runs, in server_logs/engines.json (and the log): url, node, process id, log file."""
        where = [
            {"index": i, "name": e.name, "url": e.url, "node_id": e.node_id, "node_ip": e.node_ip, "pid": e.pid,
             "log_path": e.log_path}
            for i, e in enumerate(self.engines)
            if isinstance(e, RayEngine)
        ]  # fmt: skip
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, "engines.json"), "w") as f:
            json.dump(where, f, indent=1)
        for w in where:
            logger.info("%s at %s on node %s (pid %d)", w["name"], w["url"], w["node_ip"], w["pid"])

    def endpoints(self) -> Endpoints:
        return Endpoints(self.router_url, [e.url for e in self.engines])

    # ------------------------------------------------------------------ memory (--offload-rollout, --colocate)
    def release_memory(self) -> dict[str, float]:
        """Every engine stops (aborting any stray request) and frees its weights and KV cache for the trainer;
        returns the engines' GPU memory (GB) before and after. The weight sync lets them generate again."""
        for e in self.engines:
            request_sync("POST", e.url + "/pause_generation", {"mode": "abort"}, timeout=120)
        return self._memory("/release_memory_occupation", None, "release")

    def resume_memory(self, tags: list[str]) -> dict[str, float]:
        """Engines allocate `tags` again ("weights" before the weight sync, then "kv_cache")."""
        return self._memory("/resume_memory_occupation", tags, "resume_" + "_".join(tags))

    def _memory(self, endpoint: str, tags: list[str] | None, what: str) -> dict[str, float]:
        start, before, after = time.monotonic(), 0.0, 0.0
        for e in self.engines:
            status, body = request_sync("POST", e.url + endpoint, {"tags": tags}, timeout=600)
            if status != 200:
                raise RuntimeError(
                    f"{e.name} at {e.url} answered {endpoint} with {status}: {body[:300]}; log "
                    f"{e.log_path}:\n{e.log_tail(1500)}"
                )
            out = json.loads(body or "null") or {}  # an engine may answer with no body or null
            before += out.get("gpu_memory_allocated_before", 0) / 1e9
            after += out.get("gpu_memory_allocated_after", 0) / 1e9
        return {
            f"perf/engine_{what}_gpu_gb_before": before,
            f"perf/engine_{what}_gpu_gb_after": after,
            f"perf/engine_{what}_seconds": time.monotonic() - start,
        }

    # ------------------------------------------------------------------ health and restarts
    def _health_problem(self, engine: RayEngine | ExternalEngine) -> str | None:
        """Why `engine` must be restarted, or None when it answers a 1-token generation in time."""
        if not engine.alive():
            return f"is down ({engine.exit_note()})"
        timeout = self.args.rollout_health_check_timeout
        try:
            status, body = request_sync("GET", f"{engine.url}/health_generate", timeout=timeout)
        except ConnectionError as exc:
            return f"no answer to /health_generate within {timeout:.0f}s ({exc})"
        return None if status == 200 else f"/health_generate answered {status}: {body[:200]}"

    def _restart(self, index: int, why: str) -> None:
        """Replace engine `index`: out of the router, killed, started again, given the current weights, back in."""
        old, start = self.engines[index], time.monotonic()
        if isinstance(old, ExternalEngine):
            raise RuntimeError(
                f"{old.name} at {old.url} {why}; it is external (--rollout-external-engine-addrs), "
                "so this run cannot restart it"
            )
        logger.warning("%s at %s %s; restarting it. Log tail:\n%s", old.name, old.url, why, old.log_tail(800))
        try:
            remove_worker(self.router_url, old.url)
        except (ConnectionError, RuntimeError) as exc:
            logger.warning("could not remove %s from the router: %s", old.url, exc)
        old.stop(grace=2)
        new = self._launch(index, wait=True, restart=len(self.restarts) + 1)
        self.engines[index] = new
        self._record_placement()
        if self.on_restart is not None:
            self.on_restart(new.url, [e.url for e in self.engines])
        register_worker(self.router_url, new.url)
        seconds = time.monotonic() - start
        self.restarts.append(seconds)
        logger.warning("%s replaced by %s at %s in %.1fs", old.name, new.name, new.url, seconds)

    def recover(self) -> int:
        """Restart every engine that fails its health check now; returns how many were restarted. Without
        --use-fault-tolerance a dead engine stops the run instead, with its log tail."""
        if self.router is not None and not self.router.alive():  # not restarted: every worker would be lost
            raise RuntimeError(
                f"the router died (exit {self.router.proc.returncode}); log {self.router.log_path}:\n"
                f"{self.router.log_tail(1500)}"
            )
        if not self.args.use_fault_tolerance:
            dead = [f"{e.name} ({e.exit_note()}):\n{e.log_tail(1500)}" for e in self.engines if not e.alive()]
            if dead:
                raise RuntimeError("engine server(s) died (--use-fault-tolerance restarts them): " + "\n".join(dead))
            return 0
        return self._replace_unhealthy(first_wait=0.0)

    def _replace_unhealthy(self, first_wait: float, stop: threading.Event | None = None) -> int:
        """One health sweep: restart every engine older than `first_wait` seconds that fails its check (until
        `stop` is set). Returns how many were restarted."""
        restarted = 0
        for i, engine in enumerate(self.engines):
            if (stop is not None and stop.is_set()) or time.monotonic() - engine.started < first_wait:
                continue
            problem = self._health_problem(engine)
            if problem:
                self._restart(i, problem)
                restarted += 1
        return restarted

    def _watch(self, stop: threading.Event) -> None:
        """Health-check every engine each --rollout-health-check-interval seconds until `stop`; restart failures."""
        a = self.args
        try:
            while not stop.wait(a.rollout_health_check_interval):
                self._replace_unhealthy(a.rollout_health_check_first_wait, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised by `watched` in the rollout's thread
            self._monitor_error = exc

    def watched(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
        """Run one rollout or evaluation after a recovery sweep; under --use-fault-tolerance with the health monitor
        watching. Returns fn's result and the restart metrics."""
        before = len(self.restarts)
        self.recover()
        if not self.args.use_fault_tolerance:
            return fn(), {}
        stop = threading.Event()
        self._monitor_error = None
        watcher = threading.Thread(target=self._watch, args=(stop,), name="engine-health", daemon=True)
        watcher.start()
        try:
            out = fn()
        except BaseException as exc:
            if self._monitor_error is not None:
                raise RuntimeError(f"engine restart failed: {self._monitor_error}") from exc
            raise
        finally:
            stop.set()
            watcher.join()
        if self._monitor_error is not None:
            raise RuntimeError(f"engine restart failed: {self._monitor_error}") from self._monitor_error
        new = self.restarts[before:]
        return out, {"rollout/engine_restarts": float(len(new))} | (
            {"rollout/engine_restart_seconds": sum(new)} if new else {}
        )

    def shutdown(self) -> None:
        servers = [s for s in [*self.engines, self.router] if s is not None]
        for server in servers:  # all at once: each takes a moment to exit
            server.terminate()
        for server in servers:
            server.stop()
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


# /server_info internal_states of the embedded engine that tell what a rollout cost it (sums over engines); the
# seconds against the rollout's own tell engine time from time spent around it (HTTP, grading, waiting)
COUNTERS = (
    "generated_tokens",
    "prefill_tokens",
    "prefill_passes",
    "prefill_seconds",
    "prefix_shared_tokens",
    "decode_steps",
    "decode_seconds",
    "preemptions",
    "graph_captures",
)


def engine_counters(urls: list[str]) -> dict[str, float]:
    """COUNTERS summed over the engines at `urls` that report them (other engines are left out)."""
    total: dict[str, float] = {}
    for url in urls:
        try:
            status, body = request_sync("GET", url + "/server_info", timeout=5)
            states = (json.loads(body).get("internal_states") or [{}])[0] if status == 200 else {}
        except (OSError, ValueError, AttributeError, IndexError, TypeError):
            continue  # a counter is not worth failing a rollout for; the health check handles a dead engine
        for key in COUNTERS:
            value = states.get(key) if isinstance(states, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def _warn_backend_fallback(url: str) -> None:
    """Say it in the run's own output when --rollout-engine-backend auto fell back to the padded backend (the
    engine's log says it too, but nobody reads that when the run works)."""
    status, body = request_sync("GET", url + "/server_info", timeout=30)
    note = json.loads(body).get("backend_fallback") if status == 200 else None
    if note:
        logger.warning("rollout engines run the padded backend: the paged one cannot serve this model (%s)", note)
