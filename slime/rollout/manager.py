"""RolloutManager: the Ray actor that owns data, engines, router and rewards."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from slime.data.dataset import load_prompt_data
from slime.data.source import RolloutDataSource
from slime.engine.launch import ServerProcess, launch_engine
from slime.observe.eval_metrics import dataset_metrics
from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.router.router import launch_router, register_worker
from slime.utils.misc import load_function
from slime.utils.processing_utils import load_tokenizer
from slime.utils.types import Sample

logger = logging.getLogger(__name__)


class RolloutDataSourceWithEval(RolloutDataSource):
    """The training data source plus the eval datasets (`args.eval_datasets`, resolved by slime.utils.eval_config
    when the flags are parsed), each as one group list over all its prompts. With `--disable-rollout-global-dataset`
    there is no training dataset: the rollout function brings its own prompts."""

    def __init__(self, args: Any, tokenizer: Any):
        load = dict(
            tokenizer=tokenizer,
            apply_chat_template=args.apply_chat_template,
            apply_chat_template_kwargs=args.apply_chat_template_kwargs,
            max_prompt_len=args.rollout_max_prompt_len,
            skip_invalid=args.skip_invalid_data_rows,
        )
        keys = dict(input_key=args.input_key, label_key=args.label_key, metadata_key=args.metadata_key,
                    tool_key=args.tool_key)  # fmt: skip
        dataset = load_prompt_data(args.prompt_data, **load, **keys) if args.rollout_global_dataset else None
        super().__init__(dataset, args.n_samples_per_prompt, args.rollout_shuffle, args.rollout_seed)
        self.eval_configs = {c.name: c for c in args.eval_datasets}
        self.eval_sets = {}
        for c in self.eval_configs.values():
            self.eval_sets[c.name] = load_prompt_data(c.path, **load, input_key=c.input_key, label_key=c.label_key,
                                                      metadata_key=c.metadata_key, tool_key=c.tool_key,
                                                      max_rows=c.max_prompts)  # fmt: skip

    def eval_groups(self) -> dict[str, list[list[Sample]]]:
        """{dataset name: one group of n_samples_per_eval_prompt fresh samples per prompt}, in file order."""
        out = {}
        for name, ds in self.eval_sets.items():
            cfg, groups = self.eval_configs[name], []
            n = cfg.n_samples_per_eval_prompt
            for g, s in enumerate(ds.samples):
                meta = cfg.inject_metadata(s.metadata)
                groups.append([Sample(prompt=s.prompt, label=s.label, metadata=dict(meta), group_index=g,
                                      index=g * n + k) for k in range(n)])  # fmt: skip
            out[name] = groups
        return out


def to_train_data(groups: list[list[Sample]], args: Any) -> dict[str, list]:
    """Flatten groups into the trainer's columns, one entry per sample in rollout order. A sample whose generation
    failed keeps its place (its group's statistics need it) but gets an all-zero loss mask."""
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
        masks.append([0] * s.response_length if s.status == Sample.Status.FAILED else list(mask))
    return {
        "tokens": [list(s.tokens) for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "loss_masks": masks,
        "rewards": [float(s.get_reward_value(args)) for s in samples],
        "rollout_log_probs": [list(s.rollout_log_probs or []) for s in samples],
        "teacher_log_probs": [list(s.teacher_log_probs or []) for s in samples],
    }


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
            tokenizer = load_tokenizer(args.hf_checkpoint)
            self.data_source = RolloutDataSourceWithEval(args, tokenizer)
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

    def info(self) -> dict[str, Any]:
        return {
            "router_url": self.router.url,
            "engine_urls": [e.url for e in self.engines],
            "num_train_prompts": len(self.data_source.dataset) if self.data_source.dataset else 0,
            "skipped_rows": self.data_source.dataset.skipped if self.data_source.dataset else {},
            "eval_sets": {k: len(v) for k, v in self.data_source.eval_sets.items()},
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
        if self.data_source.dataset is not None:
            metrics.setdefault("rollout/epoch", self.data_source.epoch)
        for g in groups:
            for s in g:
                s.check_alignment()
        return {"samples": groups, "metrics": metrics, "train_data": to_train_data(groups, self.args)}

    def eval(self, rollout_id: int) -> dict[str, Any]:
        """Every eval dataset once. Returns {"metrics": the function's own metrics plus, per dataset, reward mean,
        accuracy, pass@k and response length (slime.observe.eval_metrics)}."""
        self._check_engines()
        out = self.eval_fn(self.args, rollout_id, self.data_source, evaluation=True)
        if not isinstance(out, RolloutFnEvalOutput):
            raise TypeError(f"--eval-function-path returned {type(out).__name__}; evaluation needs a "
                            "RolloutFnEvalOutput(data={name: {'rewards': [...], 'samples': [...]}})")  # fmt: skip
        metrics = dict(out.metrics)
        for name, data in out.data.items():
            cfg = self.data_source.eval_configs.get(name)
            n = cfg.n_samples_per_eval_prompt if cfg else self.args.n_samples_per_eval_prompt
            metrics |= dataset_metrics(name, data, n)
        return {"metrics": metrics}

    def data_state(self) -> dict[str, Any]:
        """Where the training data stands (epoch, position, counters), for checkpoints."""
        return self.data_source.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next rollout gets the next unseen prompt of the same order."""
        self.data_source.load_state_dict(state)

    def shutdown(self) -> None:
        for server in [*self.engines, self.router]:
            if server is not None:
                server.stop()
