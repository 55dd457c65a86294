"""RolloutManager: the Ray actor that owns data, engines, router and rewards."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import ray

from slime.engine.launch import ServerProcess, launch_engine
from slime.observe.eval_metrics import dataset_metrics
from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.router.router import launch_router, register_worker
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
    def __init__(self, args: Any):
        logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
        self.args = args
        self.engines: list[ServerProcess] = []
        self.router: ServerProcess | None = None
        log_dir = os.path.join(args.output_dir, "server_logs")
        try:
            self.engines = [
                launch_engine(
                    args.hf_checkpoint, log_dir, index=i, dtype=args.rollout_engine_dtype,
                    num_threads=args.rollout_engine_threads, seed=args.seed, wait=False,
                )
                for i in range(args.rollout_num_engines)
            ]  # fmt: skip
            self.router = launch_router(log_dir, policy=args.router_policy)
            self.data_source = load_function(args.data_source_path, "--data-source-path")(args)
            for e in self.engines:
                e.wait_ready("/health", timeout=600)
                register_worker(self.router.url, e.url)
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

    def info(self) -> dict[str, Any]:
        return {
            "router_url": self.router.url,
            "engine_urls": [e.url for e in self.engines],
            "num_train_prompts": len(self.data_source),
        }

    def _check_engines(self) -> None:
        dead = [f"{e.name} (exit {e.proc.returncode}):\n{e.log_tail(1500)}" for e in self.engines if not e.alive()]
        if dead:
            raise RuntimeError("engine server(s) died: " + "\n".join(dead))

    def generate(self, rollout_id: int) -> dict[str, Any]:
        """One training rollout. Returns {"samples": [[Sample]], "metrics": {...}, "train_data": {...}}."""
        self._check_engines()
        out = self.rollout_fn(self.args, rollout_id, self.data_source)
        if isinstance(out, RolloutFnTrainOutput):
            groups, metrics = out.samples, dict(out.metrics)
        else:  # a custom rollout function may return the groups alone
            groups, metrics = out, {}
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
        self._check_engines()
        out = self.eval_fn(self.args, rollout_id, self.data_source, evaluation=True)
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

    def data_state(self) -> dict[str, Any]:
        """Where the training data stands (epoch, position, counters), for checkpoints. The buffer of handed-back
        groups is not part of it yet."""
        return self.data_source.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next rollout gets the next unseen prompt of the same order."""
        self.data_source.load_state_dict(state)

    def shutdown(self) -> None:
        for server in [*self.engines, self.router]:
            if server is not None:
                server.stop()
