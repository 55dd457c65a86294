"""RolloutManager: the Ray actor that owns data, engines, router and rewards."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from slime.engine.launch import ServerProcess, launch_engine
from slime.observe.eval_metrics import dataset_metrics
from slime.ray.placement import engine_dtype
from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.router.router import launch_router, register_worker, remove_worker
from slime.utils.http_utils import request_sync
from slime.utils.misc import load_function
from slime.utils.types import Sample

logger = logging.getLogger(__name__)


def to_train_data(groups: list[list[Sample]], args: Any, post_process: Callable | None = None) -> dict[str, list]:
    """Flatten groups into the trainer's columns, one entry per sample in rollout order. A sample whose generation
    failed, or that a hook marked `remove_sample`, keeps its place (its group's statistics need it) but gets an
    all-zero loss mask. `post_process` is `--custom-reward-post-process-path`: `(args, samples) -> (raw_rewards,
    rewards)`; its `rewards` reach the advantage estimator in place of the group normalisation."""
    sizes = {len(g) for g in groups}
    if sizes != {args.n_samples_per_prompt}:
        raise ValueError(
            f"the rollout function returned groups of sizes {sorted(sizes)}; training needs groups of exactly "
            f"--n-samples-per-prompt {args.n_samples_per_prompt}"
        )
    samples = [s for g in groups for s in g]
    masks = []
    for s in samples:
        mask = s.loss_mask if s.loss_mask is not None else [1] * s.response_length
        drop = s.status == Sample.Status.FAILED or s.remove_sample
        masks.append([0] * s.response_length if drop else list(mask))
    if post_process is None:
        rewards = [float(s.get_reward_value(args)) for s in samples]
    else:
        rewards = _post_processed(post_process(args, samples), len(samples), args.custom_reward_post_process_path)
    return {
        "tokens": [list(s.tokens) for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "loss_masks": masks,
        "rewards": rewards,
        "rollout_log_probs": [list(s.rollout_log_probs or []) for s in samples],
        "teacher_log_probs": [list(s.teacher_log_probs or []) for s in samples],
    }


def _post_processed(out: Any, n: int, path: str) -> list[float]:
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(f"--custom-reward-post-process-path {path} returned {type(out).__name__}; expected "
                        "(raw_rewards, rewards)")  # fmt: skip
    rewards = [float(r) for r in out[1]]
    if len(rewards) != n or len(out[0]) != n:
        raise ValueError(f"--custom-reward-post-process-path {path} returned {len(out[0])} raw rewards and "
                         f"{len(rewards)} rewards for {n} samples")  # fmt: skip
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError(f"--custom-reward-post-process-path {path} returned a non-finite reward")
    return rewards


@ray.remote
class RolloutManager:
    def __init__(self, args: Any, engine_gpus: list[str] | None = None):
        """`engine_gpus[i]`: the GPU engine i runs on when engines share the training GPUs; engines on GPUs of
        their own use the GPUs Ray gave this actor (see slime.ray.placement)."""
        logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
        self.args = args
        self.engine_gpus: list[str | None] = [None] * args.rollout_num_engines
        if args.rollout_device == "cuda":
            self.engine_gpus = list(engine_gpus or [str(i) for i in ray.get_gpu_ids()])
            if len(self.engine_gpus) < args.rollout_num_engines:
                raise RuntimeError(f"{args.rollout_num_engines} GPU engines need as many GPUs; got {self.engine_gpus}")
        self.engines: list[ServerProcess] = []
        self.router: ServerProcess | None = None
        self.log_dir = os.path.join(args.output_dir, "server_logs")
        self.trainer_actors: list = []  # set by attach_trainer: they push weights to a restarted engine
        self.weight_version: str | None = None  # None: engines still serve --hf-checkpoint
        self.restarts: list[float] = []  # seconds each engine restart took (fault tolerance)
        self._monitor_error: BaseException | None = None
        try:
            self.engines = [self._launch(i, wait=False) for i in range(args.rollout_num_engines)]
            self.router = launch_router(self.log_dir, policy=args.router_policy)
            self.data_source = load_function(args.data_source_path, "--data-source-path")(args)
            for e in self.engines:
                e.wait_ready("/health", timeout=600)
                register_worker(self.router.url, e.url)
            if self.engines:
                _warn_backend_fallback(self.engines[0].url)
        except BaseException:
            self.shutdown()
            raise
        host, port = self.router.url.removeprefix("http://").rsplit(":", 1)
        args.sglang_router_ip, args.sglang_router_port = host, int(port)
        self.rollout_fn = load_function(args.rollout_function_path, "--rollout-function-path")
        self.eval_fn = self.rollout_fn
        if args.eval_function_path:
            self.eval_fn = load_function(args.eval_function_path, "--eval-function-path")
        self.post_process = None
        if args.custom_reward_post_process_path:
            self.post_process = load_function(args.custom_reward_post_process_path, "--custom-reward-post-process-path")

    def _launch(self, index: int, wait: bool, restart: int = 0) -> ServerProcess:
        a = self.args
        on_gpu = a.rollout_device == "cuda"
        batch = a.sglang_max_running_requests or (256 if on_gpu else 64)
        return launch_engine(
            a.hf_checkpoint, self.log_dir, index=index, dtype=engine_dtype(a), num_threads=a.rollout_engine_threads,
            seed=a.seed, wait=wait, restart=restart, startup_timeout=600, device=a.rollout_device,
            gpu=self.engine_gpus[index], max_running_requests=1 if a.sglang_enable_deterministic_inference else batch,
            extra_args=engine_flags(a),
        )  # fmt: skip

    def attach_trainer(self, actors: list) -> None:
        """The training ranks (Ray actor handles), so a restarted engine can be given the current weights."""
        self.trainer_actors = list(actors)

    def set_weight_version(self, version: str) -> None:
        """The version the trainer last synced to every engine; a restarted engine gets the same."""
        self.weight_version = version

    def info(self) -> dict[str, Any]:
        return {
            "router_url": self.router.url,
            "engine_urls": [e.url for e in self.engines],
            "num_train_prompts": len(self.data_source),
        }

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
                raise RuntimeError(f"{e.name} at {e.url} answered {endpoint} with {status}: {body[:300]}; log "
                                   f"{e.log_path}:\n{e.log_tail(1500)}")  # fmt: skip
            out = json.loads(body or "null") or {}  # an engine may answer with no body or null
            before += out.get("gpu_memory_allocated_before", 0) / 1e9
            after += out.get("gpu_memory_allocated_after", 0) / 1e9
        return {f"perf/engine_{what}_gpu_gb_before": before, f"perf/engine_{what}_gpu_gb_after": after,
                f"perf/engine_{what}_seconds": time.monotonic() - start}  # fmt: skip

    # ------------------------------------------------------------------ fault tolerance
    def _health_problem(self, engine: ServerProcess) -> str | None:
        """Why `engine` must be restarted, or None when it answers a 1-token generation in time."""
        if not engine.alive():
            return f"exited with code {engine.proc.returncode}"
        timeout = self.args.rollout_health_check_timeout
        try:
            status, body = request_sync("GET", f"{engine.url}/health_generate", timeout=timeout)
        except ConnectionError as exc:
            return f"no answer to /health_generate within {timeout:.0f}s ({exc})"
        return None if status == 200 else f"/health_generate answered {status}: {body[:200]}"

    def _restart(self, index: int, why: str) -> None:
        """Replace engine `index`: out of the router, killed, started again, given the current weights, back in."""
        old, start = self.engines[index], time.monotonic()
        logger.warning("%s at %s %s; restarting it. Log tail:\n%s", old.name, old.url, why, old.log_tail(800))
        try:
            remove_worker(self.router.url, old.url)
        except (ConnectionError, RuntimeError) as exc:
            logger.warning("could not remove %s from the router: %s", old.url, exc)
        old.stop(grace=2)
        new = self._launch(index, wait=True, restart=len(self.restarts) + 1)
        self.engines[index] = new
        if self.trainer_actors and self.weight_version is not None:
            refs = [a.push_weights.remote([new.url], self.weight_version) for a in self.trainer_actors]
            ray.get(refs, timeout=self.args.update_weight_timeout)
        if self.trainer_actors:
            ray.get([a.connect_engines.remote([e.url for e in self.engines]) for a in self.trainer_actors],
                    timeout=self.args.update_weight_timeout)  # fmt: skip
        register_worker(self.router.url, new.url)
        seconds = time.monotonic() - start
        self.restarts.append(seconds)
        logger.warning("%s replaced by %s at %s (weight version %s) in %.1fs", old.name, new.name, new.url,
                       self.weight_version, seconds)  # fmt: skip

    def recover_engines(self) -> int:
        """Restart every engine that fails its health check now; returns how many were restarted. Without
        --use-fault-tolerance a dead engine stops the run instead, with its log tail."""
        if not self.router.alive():  # not restarted: every worker would have to be registered again
            raise RuntimeError(f"the router died (exit {self.router.proc.returncode}); log {self.router.log_path}:\n"
                               f"{self.router.log_tail(1500)}")  # fmt: skip
        if not self.args.use_fault_tolerance:
            dead = [f"{e.name} (exit {e.proc.returncode}):\n{e.log_tail(1500)}" for e in self.engines if not e.alive()]
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
        except BaseException as exc:  # noqa: BLE001 - re-raised by _guarded in the rollout's thread
            self._monitor_error = exc

    def _guarded(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
        """Run one rollout or evaluation; under --use-fault-tolerance, with the health monitor watching."""
        before = len(self.restarts)
        self.recover_engines()
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

    # ------------------------------------------------------------------ rollouts
    def generate(self, rollout_id: int) -> dict[str, Any]:
        """One training rollout. Returns {"samples": [[Sample]], "metrics": {...}, "train_data": {...}}."""
        out, health = self._guarded(lambda: self.rollout_fn(self.args, rollout_id, self.data_source))
        if isinstance(out, RolloutFnTrainOutput):
            groups, metrics = out.samples, dict(out.metrics)
        else:  # a custom rollout function may return the groups alone
            groups, metrics = out, {}
        metrics |= health
        if getattr(self.data_source, "dataset", None) is not None:
            metrics.setdefault("rollout/epoch", self.data_source.epoch)
        for g in groups:
            for s in g:
                s.check_alignment()
        train_data = to_train_data(groups, self.args, self.post_process)
        return {"samples": groups, "metrics": metrics, "train_data": train_data}

    def eval(self, rollout_id: int) -> dict[str, Any]:
        """Every eval dataset once. Returns {"metrics": the function's own metrics plus, per dataset, reward mean,
        accuracy, pass@k and response length (slime.observe.eval_metrics)}."""
        out, _ = self._guarded(lambda: self.eval_fn(self.args, rollout_id, self.data_source, evaluation=True))
        if not isinstance(out, RolloutFnEvalOutput):
            raise TypeError(f"--eval-function-path returned {type(out).__name__}; evaluation needs a "
                            "RolloutFnEvalOutput(data={name: {'rewards': [...], 'samples': [...]}})")  # fmt: skip
        metrics = dict(out.metrics)
        configs = {c.name: c for c in self.args.eval_datasets}
        for name, data in out.data.items():
            cfg = configs.get(name)
            n = cfg.n_samples_per_eval_prompt if cfg else self.args.n_samples_per_eval_prompt
            metrics |= dataset_metrics(name, data, n)
        return {"metrics": metrics}

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str, rollout_id: int) -> None:
        """Write the rollout side of checkpoint `rollout_id` into the staging `folder`: the data source's state
        (position and buffered groups) and, last, rollout.json."""
        folder_ = Path(folder)
        if hasattr(self.data_source, "state_dict"):
            with open(folder_ / "data_source.pkl", "wb") as f:
                pickle.dump(self.data_source.state_dict(), f)
        else:
            logger.warning("%s has no state_dict(): a resumed run restarts its position", type(self.data_source))
        meta = {"rollout_id": rollout_id, "weight_version": self.weight_version, "saved_at": time.time()}
        (folder_ / "rollout.json").write_text(json.dumps(meta))

    def load(self, folder: str) -> dict[str, Any]:
        """Restore the data source from a checkpoint; returns rollout.json."""
        folder_ = Path(folder)
        state_file = folder_ / "data_source.pkl"
        if state_file.exists() and hasattr(self.data_source, "load_state_dict"):
            with open(state_file, "rb") as f:
                self.data_source.load_state_dict(pickle.load(f))
        return json.loads((folder_ / "rollout.json").read_text())

    def shutdown(self) -> None:
        servers = [s for s in [*self.engines, self.router] if s is not None]
        for server in servers:  # all at once: each takes a moment to exit
            server.terminate()
        for server in servers:
            server.stop()


def _warn_backend_fallback(url: str) -> None:
    """Say it in the run's own output when --rollout-engine-backend auto fell back to the padded backend (the
    engine's log says it too, but nobody reads that when the run works)."""
    status, body = request_sync("GET", url + "/server_info", timeout=30)
    note = json.loads(body).get("backend_fallback") if status == 200 else None
    if note:
        logger.warning("rollout engines run the padded backend: the paged one cannot serve this model (%s)", note)


def engine_flags(args: Any) -> list[str]:
    """The embedded engine server's flags that follow from the run's --sglang-* and --rollout-engine-* flags."""
    flags = ["--backend", args.rollout_engine_backend]
    if args.sglang_chunked_prefill_size:
        flags += ["--max-prefill-tokens", str(args.sglang_chunked_prefill_size)]
    if args.rollout_engine_backend == "padded":
        return flags
    fraction = args.sglang_mem_fraction_static
    if fraction is None:
        fraction = 0.6 if args.colocate else 0.35 if args.engines_share_trainer_gpus else 0.85
    flags += ["--mem-fraction-static", str(fraction), "--page-size", str(args.sglang_page_size),
              "--cuda-graph-max-bs", str(args.sglang_cuda_graph_max_bs)]  # fmt: skip
    if args.sglang_disable_cuda_graph:
        flags.append("--disable-cuda-graph")
    if args.sglang_disable_torch_compile:
        flags.append("--disable-torch-compile")
    return flags
