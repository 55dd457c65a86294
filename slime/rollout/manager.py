"""RolloutManager: the Ray actor that owns data, the engine fleet (engines and router) and the rollout hooks."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from slime.engine.fleet import Endpoints, EngineFleet, engine_counters
from slime.observe.eval_metrics import dataset_metrics
from slime.observe.metrics import sample_records
from slime.rollout import sglang_rollout  # its ROLLOUT_STOP by module: Ray pickles this class, not an Event
from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.rollout.fully_async_rollout import unserved_groups
from slime.rollout.sandbox import allow_weak_sandbox
from slime.rollout.scoring import reward_key
from slime.rollout.sglang_rollout import RolloutStopped, abort_all, rollout_metrics
from slime.rollout.staleness import set_engine_version, split_stale, staleness_metrics
from slime.utils.async_utils import run
from slime.utils.misc import load_function
from slime.utils.types import Sample, TrainBatch, trajectory_numbers

logger = logging.getLogger(__name__)


def to_train_data(groups: list[list[Sample]], args: Any, post_process: Callable | None = None) -> TrainBatch:
    """Flatten groups into the trainer's batch, one entry per sample in rollout order. A sample whose generation
    failed, or that a hook marked `remove_sample`, keeps its place (its group's statistics need it) but gets an
    all-zero loss mask. `post_process` is `--custom-reward-post-process-path`: `(args, samples) -> (raw_rewards,
    rewards)`; its `rewards` reach the advantage estimator in place of the group normalisation.

    Groups normally hold `--n-samples-per-prompt` samples; one whose trajectories came back as several samples
    (`Sample.rollout_id` shared) is larger, and the batch records every group's size and each sample's trajectory."""
    samples = [s for g in groups for s in g]
    trajectories = trajectory_numbers([s.rollout_id for s in samples])
    per_group, start = set(), 0
    for g in groups:  # trajectories per group
        per_group.add(len(set(trajectories[start : start + len(g)])))
        start += len(g)
    if per_group != {args.n_samples_per_prompt}:
        raise ValueError(
            f"the rollout function returned groups of {sorted(per_group)} trajectories; training needs groups "
            f"of exactly --n-samples-per-prompt {args.n_samples_per_prompt}"
        )
    if post_process is None:
        rewards = [float(s.get_reward_value(args)) for s in samples]
    else:  # first: it may mark samples remove_sample
        rewards = _post_processed(post_process(args, samples), len(samples), args.custom_reward_post_process_path)
    masks = []
    for s in samples:
        mask = s.loss_mask if s.loss_mask is not None else [1] * s.response_length
        drop = s.status == Sample.Status.FAILED or s.remove_sample
        masks.append([0] * s.response_length if drop else list(mask))
    return TrainBatch(
        tokens=[list(s.tokens) for s in samples],
        response_lengths=[s.response_length for s in samples],
        loss_masks=masks,
        rewards=rewards,
        rollout_log_probs=[list(s.rollout_log_probs or []) for s in samples],
        teacher_log_probs=[list(s.teacher_log_probs or []) for s in samples],
        group_sizes=[len(g) for g in groups],
        trajectories=trajectories,
    )


def train_batch_from_dict(data: Any, flag: str) -> TrainBatch:
    """A slime-style train-data dict (what --custom-convert-samples-to-train-data-path returns) as a TrainBatch:
    tokens, response_lengths, rewards and loss_masks required; rollout_log_probs, teacher_log_probs and
    rollout_ids (samples of one trajectory share one) optional. Lengths are checked against each other."""
    if not isinstance(data, dict):
        raise TypeError(f"{flag} returned {type(data).__name__}; expected a dict of per-sample lists")
    missing = [k for k in ("tokens", "response_lengths", "rewards", "loss_masks") if k not in data]
    if missing:
        raise KeyError(f"{flag} returned a dict without {missing}; it has {sorted(data)}")
    n = len(data["tokens"])

    def column(key: str, per_token: bool) -> list:
        values = [list(map(float, v)) if per_token else v for v in (data.get(key) or [])]
        if values and len(values) != n:
            raise ValueError(f"{flag}: {key} has {len(values)} entries for {n} samples")
        return values

    lengths = [int(r) for r in data["response_lengths"]]
    if len(lengths) != n or len(data["rewards"]) != n or len(data["loss_masks"]) != n:
        raise ValueError(f"{flag}: tokens, response_lengths, rewards and loss_masks need {n} entries each")
    masks = [[int(x) for x in m] for m in data["loss_masks"]]
    for name, col in (
        ("loss_masks", masks),
        *((k, column(k, True)) for k in ("rollout_log_probs", "teacher_log_probs")),
    ):
        bad = [i for i, v in enumerate(col) if len(v) != lengths[i]]
        if bad:
            raise ValueError(
                f"{flag}: {name}[{bad[0]}] has {len(col[bad[0]])} entries, response_lengths says {lengths[bad[0]]}"
            )
    ids = column("rollout_ids", False)
    return TrainBatch(
        tokens=[[int(t) for t in seq] for seq in data["tokens"]],
        response_lengths=lengths,
        loss_masks=masks,
        rewards=[float(r) for r in data["rewards"]],
        rollout_log_probs=column("rollout_log_probs", True),
        teacher_log_probs=column("teacher_log_probs", True),
        trajectories=trajectory_numbers(ids) if ids else [],
    )


def _post_processed(out: Any, n: int, path: str) -> list[float]:
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(
            f"--custom-reward-post-process-path {path} returned {type(out).__name__}; expected (raw_rewards, rewards)"
        )
    rewards = [float(r) for r in out[1]]
    if len(rewards) != n or len(out[0]) != n:
        raise ValueError(
            f"--custom-reward-post-process-path {path} returned {len(out[0])} raw rewards and "
            f"{len(rewards)} rewards for {n} samples"
        )
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError(f"--custom-reward-post-process-path {path} returned a non-finite reward")
    return rewards


@ray.remote(concurrency_groups={"control": 1})  # stop_rollout must run while generate does
class RolloutManager:
    """Owns the data source, the engine fleet and the rollout, eval and reward hooks; hands each rollout to the
    trainer as a TrainBatch."""

    def __init__(self, args: Any, shared_gpus: list[tuple[str, str]] | None = None):
        """`shared_gpus[i]`: (Ray node id, GPU id) engine i runs on when engines share the training GPUs; other
        engines are placed by Ray (see slime.engine.fleet)."""
        logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
        self.args = args
        if args.allow_weak_sandbox:
            allow_weak_sandbox(True)  # custom generate functions run here
        self.trainer_actors: list = []  # set by attach_trainer: they push weights to a restarted engine
        self.weight_version: str | None = None  # None: engines still serve --hf-checkpoint
        self.untrained: dict[int, dict] = {}  # --async: rollouts generated ahead of the step that trains them
        self.before_rollout: tuple[int, bytes] | None = None  # (rollout id, data source state as it began)
        self.fleet = None  # --debug-train-only: nothing generates
        if not args.debug_train_only:
            self.fleet = EngineFleet(args, shared_gpus)  # the engines boot while the data and the hooks load
            self.fleet.on_restart = self._give_weights
        try:
            self._load_hooks(args)
        except BaseException:
            if self.fleet is not None:
                self.fleet.shutdown()
            raise
        if self.fleet is not None:
            self.fleet.wait_ready()  # stops the engines and router itself if one fails

    def _load_hooks(self, args: Any) -> None:
        self.data_source = load_function(args.data_source_path, "--data-source-path")(args)
        self.rollout_fn = load_function(args.rollout_function_path, "--rollout-function-path")
        self.eval_fn = self.rollout_fn
        if args.eval_function_path:
            self.eval_fn = load_function(args.eval_function_path, "--eval-function-path")
        self.post_process = None
        if args.custom_reward_post_process_path:
            self.post_process = load_function(args.custom_reward_post_process_path, "--custom-reward-post-process-path")
        self.hooks = {
            name: load_function(path, flag) if path else None
            for name, path, flag in (
                (
                    "convert",
                    args.custom_convert_samples_to_train_data_path,
                    "--custom-convert-samples-to-train-data-path",
                ),
                ("rollout_log", args.custom_rollout_log_function_path, "--custom-rollout-log-function-path"),
                ("eval_log", args.custom_eval_rollout_log_function_path, "--custom-eval-rollout-log-function-path"),
            )
        }

    def attach_trainer(self, actors: list) -> None:
        """The training ranks (Ray actor handles), so a restarted engine can be given the current weights."""
        self.trainer_actors = list(actors)

    def set_weight_version(self, version: str) -> None:
        """The version the trainer last synced to every engine; a restarted engine gets the same."""
        self.weight_version = version
        set_engine_version(version)  # rollout functions in this process bound how far ahead they generate by it

    def _give_weights(self, url: str, engine_urls: list[str]) -> None:
        """A restarted engine at `url` gets the current weights; the trainer learns the new engine set."""
        if not self.trainer_actors:
            return
        timeout = self.args.update_weight_timeout
        if self.weight_version is not None:
            ray.get([a.push_weights.remote([url], self.weight_version) for a in self.trainer_actors], timeout=timeout)
        ray.get([a.connect_engines.remote(engine_urls) for a in self.trainer_actors], timeout=timeout)
        logger.warning("engine at %s has weight version %s", url, self.weight_version)

    def endpoints(self) -> Endpoints:
        return self.fleet.endpoints() if self.fleet else Endpoints(router_url="", engine_urls=[])

    def num_train_prompts(self) -> int:
        return len(self.data_source)

    def _watched(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
        return self.fleet.watched(fn) if self.fleet else (fn(), {})

    def release_memory(self) -> dict[str, float]:
        return self.fleet.release_memory()

    def resume_memory(self, tags: list[str]) -> dict[str, float]:
        return self.fleet.resume_memory(tags)

    def recover_engines(self) -> int:
        return self.fleet.recover()

    # ------------------------------------------------------------------ rollouts
    def generate(self, rollout_id: int) -> dict[str, Any]:
        """One training rollout. Returns {"samples": [[Sample]], "metrics": {...}, "train_data": {...},
        "generated": (start, end) wall-clock seconds}."""
        if hasattr(self.data_source, "begin_rollout"):  # the buffer filter gets the rollout id its flag promises
            self.data_source.begin_rollout(rollout_id)
        if rollout_id in self.untrained:  # generated before a checkpoint this run resumed from
            return self.untrained[rollout_id]
        start, started_at = time.monotonic(), time.time()
        if hasattr(self.data_source, "state_dict"):  # a rollout cut short by a stop is rewound to here
            self.before_rollout = (rollout_id, pickle.dumps(self.data_source.state_dict()))
        counted = self.fleet is not None and not self.args.load_debug_rollout_data
        before = engine_counters(self.fleet.endpoints().engine_urls) if counted else {}
        if self.args.load_debug_rollout_data:
            out, health = load_debug_rollout_data(self.args, rollout_id), {}
        else:
            out, health = self._watched(lambda: self.rollout_fn(self.args, rollout_id, self.data_source))
        if sglang_rollout.ROLLOUT_STOP.is_set():  # a custom rollout function may return what it has once aborted
            raise RolloutStopped(f"rollout {rollout_id} stopped: the run is stopping")
        if isinstance(out, RolloutFnTrainOutput):
            groups, metrics = out.samples, dict(out.metrics)
        else:  # a custom rollout function may return the groups alone
            groups, metrics = out, {}
        if self.args.max_staleness is not None:  # any rollout function: e.g. partial rollouts resumed from long ago
            fresh, stale = split_stale(groups, rollout_id, self.args.max_staleness)
            metrics["rollout/stale_groups"] = metrics.get("rollout/stale_groups", 0) + len(stale)
            metrics.setdefault("rollout/stale_dropped_groups", 0)
            if not self.args.keep_stale_samples:
                metrics["rollout/stale_dropped_groups"] += len(stale)
                groups = fresh
                if not groups:
                    raise RuntimeError(
                        f"rollout {rollout_id}: every group was more than --max-staleness {self.args.max_staleness} "
                        "steps old; nothing is left to train on"
                    )
        metrics |= staleness_metrics(groups, rollout_id)
        if self.args.save_debug_rollout_data:
            save_debug_rollout_data(self.args.save_debug_rollout_data, rollout_id, groups, self.args.run_id)
        seconds = time.monotonic() - start
        samples = [s for g in groups for s in g]
        if "rollout/reward_mean" not in metrics:  # a function that returned none gets the standard ones
            metrics = rollout_metrics(groups, seconds, key=reward_key(self.args)) | metrics
        if getattr(self.data_source, "dataset", None) is not None:
            metrics.setdefault("rollout/epoch", self.data_source.epoch)
        if self.hooks["rollout_log"] is not None:
            if self.hooks["rollout_log"](rollout_id, self.args, samples, metrics, seconds):
                metrics = {}  # the function logged the rollout itself
        metrics |= health
        if counted:  # what the engines did for this rollout (a restarted engine's counters start again: left out)
            after = engine_counters(self.fleet.endpoints().engine_urls)
            metrics |= {f"engine/{k}": v - before[k] for k, v in after.items() if v >= before.get(k, float("inf"))}
        for s in samples:
            s.check_alignment()
        if self.hooks["convert"] is not None:
            flag = "--custom-convert-samples-to-train-data-path"
            train_data = train_batch_from_dict(self.hooks["convert"](self.args, samples), flag)
        else:
            train_data = to_train_data(groups, self.args, self.post_process)
        rollout = {
            "samples": groups,
            "metrics": metrics,
            "train_data": train_data,
            "generated": (started_at, time.time()),
        }
        if self.args.async_train:  # generated ahead of its training: a checkpoint taken meanwhile must hold it
            self.untrained[rollout_id] = rollout
        return rollout

    @ray.method(concurrency_group="control")
    def stop_rollout(self) -> None:
        """The run is stopping (Ctrl-C): the rollout under way ends within a second and the engines abort what
        they run, so the driver can checkpoint the last trained step instead of waiting for this rollout."""
        sglang_rollout.ROLLOUT_STOP.set()
        if self.fleet is not None:
            run(abort_all(self.fleet.endpoints().engine_urls), timeout=60)

    def rewind(self, rollout_id: int) -> bool:
        """Put the data source back where it stood before rollout `rollout_id` began (a rollout cut short by a
        stop), so a checkpoint taken now serves its prompts again. False when that cannot be done: the data
        source keeps no state_dict, or a fully-async worker holds groups drawn meanwhile."""
        if self.before_rollout is None or self.before_rollout[0] != rollout_id or unserved_groups(self.data_source):
            return False
        self.data_source.load_state_dict(pickle.loads(self.before_rollout[1]))
        self.untrained.pop(rollout_id, None)
        return True

    def trained(self, rollout_id: int) -> None:
        """Rollouts up to `rollout_id` are trained: checkpoints no longer need to hold them."""
        for k in [k for k in self.untrained if k <= rollout_id]:
            del self.untrained[k]

    def eval(self, rollout_id: int) -> dict[str, Any]:
        """Every eval dataset once. Returns {"metrics": the function's own metrics plus, per dataset, reward mean,
        accuracy, pass@k and response length (slime.observe.eval_metrics)}."""
        out, _ = self._watched(lambda: self.eval_fn(self.args, rollout_id, self.data_source, evaluation=True))
        if not isinstance(out, RolloutFnEvalOutput):
            raise TypeError(
                f"--eval-function-path returned {type(out).__name__}; evaluation needs a "
                "RolloutFnEvalOutput(data={name: {'rewards': [...], 'samples': [...]}})"
            )
        metrics = dict(out.metrics)
        log = self.hooks["eval_log"]
        if log is not None and log(rollout_id, self.args, out.data, metrics):
            return {"metrics": {}}  # the function logged the evaluation itself
        configs = {c.name: c for c in self.args.eval_datasets}
        records = []
        for name, data in out.data.items():
            cfg = configs.get(name)
            n = cfg.n_samples_per_eval_prompt if cfg else self.args.n_samples_per_eval_prompt
            metrics |= dataset_metrics(name, data, n)
            samples = [s for s in data.get("samples") or [] if s is not None]
            groups = [samples[i : i + n] for i in range(0, len(samples), n)]
            records += sample_records(groups, f"eval/{name}", self.args.log_samples_count)
        return {"metrics": metrics, "samples": records}

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str, rollout_id: int) -> None:
        """Write the rollout side of checkpoint `rollout_id` into the staging `folder`: the data source's state
        (position and buffered groups) and, last, rollout.json."""
        save_data_source(self.data_source, Path(folder), rollout_id, unserved_groups(self.data_source))
        ahead = {k: v for k, v in self.untrained.items() if k > rollout_id}
        if ahead:  # the data source has moved past their prompts: without them a resumed run would skip them
            with open(Path(folder) / "untrained_rollouts.pkl", "wb") as f:
                pickle.dump(ahead, f)
        meta = {"rollout_id": rollout_id, "weight_version": self.weight_version, "saved_at": time.time()}
        meta["run_id"] = self.args.run_id
        (Path(folder) / "rollout.json").write_text(json.dumps(meta))

    def load(self, folder: str) -> dict[str, Any]:
        """Restore the data source from a checkpoint; returns rollout.json."""
        meta = json.loads((Path(folder) / "rollout.json").read_text())
        load_data_source(self.data_source, Path(folder), meta["rollout_id"])
        ahead = Path(folder) / "untrained_rollouts.pkl"
        if ahead.exists():
            with open(ahead, "rb") as f:
                self.untrained = pickle.load(f)
        return meta

    def shutdown(self) -> None:
        if getattr(self, "fleet", None) is not None:
            self.fleet.shutdown()


def save_data_source(source: Any, folder: Path, rollout_id: int, unserved: list[list[Sample]] = ()) -> None:
    """The data source's part of a checkpoint: `state_dict()` pickled into the checkpoint folder, or, for a
    slime-style data source, its own `save(rollout_id)` (it writes under --save itself). `unserved`: groups drawn
    but not yet trained (a fully-async worker's), saved at the head of the buffer so a resumed run serves them."""
    if hasattr(source, "state_dict"):
        state = source.state_dict()
        if unserved:
            if "buffer" not in state:
                logger.warning(
                    "%s keeps no buffer: %d drawn, untrained groups are not saved", type(source), len(unserved)
                )
            else:
                state["buffer"] = [[s.to_dict() for s in g] for g in unserved] + state["buffer"]
        with open(folder / "data_source.pkl", "wb") as f:
            pickle.dump(state, f)
    elif hasattr(source, "save"):
        source.save(rollout_id)
    else:
        logger.warning("%s has no state_dict() or save(): a resumed run restarts its position", type(source))


def load_data_source(source: Any, folder: Path, rollout_id: int) -> None:
    """Restore what `save_data_source` kept for checkpoint `rollout_id`."""
    state_file = folder / "data_source.pkl"
    if hasattr(source, "load_state_dict"):
        if not state_file.exists():
            raise FileNotFoundError(
                f"{state_file} is missing: the data position and buffer of checkpoint {rollout_id} cannot be restored"
            )
        with open(state_file, "rb") as f:
            source.load_state_dict(pickle.load(f))
    elif hasattr(source, "load"):
        source.load(rollout_id)


def save_debug_rollout_data(path: str, rollout_id: int, groups: list[list[Sample]], run_id: str = "") -> None:
    """--save-debug-rollout-data: one rollout's groups as plain dicts (a later run, or a notebook, reads them)."""
    target = Path(path.format(rollout_id=rollout_id))
    target.parent.mkdir(parents=True, exist_ok=True)
    saved = {"rollout_id": rollout_id, "run_id": run_id, "samples": [[s.to_dict() for s in g] for g in groups]}
    with open(target, "wb") as f:
        pickle.dump(saved, f)


def load_debug_rollout_data(args: Any, rollout_id: int) -> list[list[Sample]]:
    """--load-debug-rollout-data: the groups a run saved for `rollout_id` (a leading share of them under
    --load-debug-rollout-data-subsample)."""
    path = Path(args.load_debug_rollout_data.format(rollout_id=rollout_id))
    if not path.exists():
        raise FileNotFoundError(f"--load-debug-rollout-data: {path} does not exist (rollout {rollout_id})")
    with open(path, "rb") as f:
        saved = pickle.load(f)
    groups = [[Sample.from_dict(d) for d in g] for g in saved["samples"]]
    if args.load_debug_rollout_data_subsample is not None:
        groups = groups[: max(1, int(len(groups) * args.load_debug_rollout_data_subsample))]
    return groups
