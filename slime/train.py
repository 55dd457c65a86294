"""The RL loop: rollout -> train -> weight sync -> eval, one after the other or with the next rollout generating
during training (--async). Entry point of `slime-train`, `train.py` and `train_async.py`."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from slime.config.arguments import Settings, batch_plan, parse_flags, settle
from slime.config.cluster import placement_line
from slime.data.dataset import DataError
from slime.observe.metrics import (
    SAMPLES,
    MetricsLogger,
    OutputDirError,
    claim_output_dir,
    sample_records,
    start_wandb,
    tensorboard_dir,
    write_run_record,
)
from slime.ray.train_group import TrainGroup
from slime.rollout.data_source import check_prompt_files
from slime.rollout.manager import RolloutManager
from slime.trainer import checkpoint
from slime.utils.http_utils import release_port

STOP = threading.Event()  # set by a first Ctrl-C while steps run (see main): cut the rollout, checkpoint, stop
STEPPING = threading.Event()  # steps are running: a Ctrl-C can wait for a training step to end instead of cutting it
CUT_PATIENCE_S = 10.0  # how long a stopped rollout may take to come back before the run stops without it


class RolloutCut(Exception):
    """A first Ctrl-C came while rollout `rollout_id` generated: it was stopped, nothing of it is trained."""

    def __init__(self, rollout_id: int, returned: bool):
        super().__init__(f"rollout {rollout_id} cut short")
        self.rollout_id, self.returned = rollout_id, returned
        self.trained: tuple[int, dict] | None = None  # (--async) the step trained before the cut, to log


def train(args: Settings) -> dict:
    """Run rollouts `start..--num-rollout-1` (start > 0 when --load holds a checkpoint) with settled `args`; returns
    the last rollout, train, sync and eval metrics."""
    check_prompt_files(args)
    claim_output_dir(args)
    write_run_record(args)
    if args.load and (found := checkpoint.latest(args.load)) is not None:
        checkpoint.verify(found[1])  # before anything starts: a damaged checkpoint fails in seconds, not minutes
    own_ray = start_ray()  # a cluster the caller started is left running
    trainer, manager, metrics_log = None, None, None
    last: dict = {}
    try:
        if cluster_gpus() != args.cluster_gpus:
            raise RuntimeError(
                f"the configuration was settled for {args.cluster_gpus} GPUs, but the Ray cluster has "
                f"{cluster_gpus()}: settle it with parse_args(..., cluster_gpus=cluster_gpus())"
            )
        print(placement_line(args))
        if not args.debug_rollout_only:
            print(batch_plan(args))
            trainer = TrainGroup(args, wait=False)  # loads while the manager starts engines
        shared = trainer.gpus if args.engines_share_trainer_gpus else None
        # on this node: the router it starts listens at the address settled here; its engines are placed by Ray
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        manager = RolloutManager.options(num_cpus=0, scheduling_strategy=here).remote(args, shared)
        if trainer is not None:
            trainer.wait_ready()
        endpoints = wait(manager.endpoints.remote(), 1800, "the rollout manager to start its engines and router")
        prompts = wait(manager.num_train_prompts.remote(), 60, "the rollout manager")
        where = "no engines"
        if endpoints.engine_urls:
            where = f"engines {endpoints.engine_urls} behind {endpoints.router_url}"
        print(f"rollout: {prompts} prompts, {where}")
        if trainer is not None and not args.debug_train_only:
            trainer.call("connect_engines", endpoints.engine_urls)
            wait(manager.attach_trainer.remote(trainer.actors), 60, "the rollout manager")
        start, saved_at = resume(args, trainer, manager)
        if trainer is not None and args.offload_train:  # engines generate first: the GPU is theirs
            trainer.call("offload", what="training ranks to move to CPU")
        metrics_log = MetricsLogger(
            args.output_dir,
            resume_after=saved_at,
            purge_step=start if args.load else None,
            tensorboard_dir=tensorboard_dir(args),
            wandb_run=start_wandb(args, resumed=bool(saved_at)),
            run_id=args.run_id,
        )
        has_eval = bool(args.eval_datasets) and not args.debug_train_only
        if has_eval and not args.skip_eval_before_train and not saved_at:  # a fresh run, not a resumed one
            last["eval_before"] = log(metrics_log, start, evaluate(args, manager, start))
        steps = overlapped_steps if args.async_train else synchronous_steps
        progress = dict(total=args.num_rollout - start, desc="rollout", unit="step", file=sys.stdout)
        STEPPING.set()
        saved_through = start - 1  # the last step a checkpoint holds (a resumed run starts after its checkpoint)
        try:
            for rollout_id, metrics in tqdm(steps(args, start, trainer, manager), **progress):
                last["rollout"] = log(metrics_log, rollout_id, metrics)
                done = rollout_id + 1
                due = (args.save_interval and done % args.save_interval == 0) or done == args.num_rollout
                if args.save and (due or STOP.is_set()):
                    save(args, rollout_id, trainer, manager)
                    saved_through = rollout_id
                if STOP.is_set():
                    raise KeyboardInterrupt
                if has_eval and args.eval_interval and (done % args.eval_interval == 0 or done == args.num_rollout):
                    last["eval"] = log(metrics_log, done, evaluate(args, manager, done))
        except RolloutCut as cut:
            if cut.trained is not None:
                log(metrics_log, *cut.trained)
            checkpoint_cut(args, cut, saved_through, trainer, manager)
            raise KeyboardInterrupt from None
    finally:
        STEPPING.clear()
        # Ctrl-C: --async always has a rollout in flight, which the manager would finish before shutting down
        patience = 5 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 60
        if trainer is not None:
            trainer.shutdown()
        if manager is not None:
            try:  # the manager may still be inside a rollout: then it is killed (engines and router die with it)
                ray.get(manager.shutdown.remote(), timeout=patience)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
                pass
            ray.kill(manager)
        if metrics_log is not None:
            metrics_log.close()
            if args.write_report:
                write_report_or_say_why(args.output_dir)
        release_port(args.sglang_router_ip, args.sglang_router_port)  # reserved by settle_router
        if own_ray:
            ray.shutdown()
    return last


def wait(ref, timeout: float, what: str):
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError as exc:
        raise TimeoutError(f"waited {timeout:.0f}s for {what}") from exc


def wait_rollout(args, manager, ref, rollout_id: int, fetch: bool = True) -> dict | None:
    """Rollout `rollout_id`'s result (None unless `fetch`: only wait until it is there); a first Ctrl-C meanwhile
    stops it (RolloutCut) instead of waiting for it."""
    deadline = time.monotonic() + args.rollout_timeout
    while not ray.wait([ref], timeout=0.25)[0]:
        if STOP.is_set():
            manager.stop_rollout.remote()
            raise RolloutCut(rollout_id, returned=bool(ray.wait([ref], timeout=CUT_PATIENCE_S)[0]))
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {args.rollout_timeout:.0f}s for rollout {rollout_id}")
    return ray.get(ref) if fetch else None


def checkpoint_cut(args, cut: RolloutCut, saved_through: int, trainer: TrainGroup | None, manager) -> None:
    """After a cut rollout: checkpoint the last trained step under --save, unless a checkpoint already holds it,
    with the data source put back to before the cut rollout so a resumed run generates it again."""
    last_trained = cut.rollout_id - 1
    if not args.save or last_trained <= saved_through:
        return
    if cut.returned and wait(manager.rewind.remote(cut.rollout_id), 60, "the rollout manager"):
        save(args, last_trained, trainer, manager)
        return
    why = "it did not stop in time" if not cut.returned else "its data source cannot be put back"
    print(f"\nrollout {cut.rollout_id} was cut short and {why}: step {last_trained} is not checkpointed", flush=True)


def synchronous_steps(args, start: int, trainer: TrainGroup | None, manager) -> Iterator[tuple[int, dict]]:
    """Rollout, train, sync, one after the other: every sample is trained on the weights that generated it."""
    for rollout_id in range(start, args.num_rollout):
        yield rollout_id, step(args, rollout_id, trainer, manager)


def step(args, rollout_id: int, trainer: TrainGroup | None, manager) -> dict:
    """One rollout, the training on it and the weight sync; returns the step's metrics. Under --offload-rollout
    engines free their memory for the training, under --offload-train the trainer comes back from CPU for it."""
    start = time.monotonic()
    rollout = wait_rollout(args, manager, manager.generate.remote(rollout_id), rollout_id)
    rollout_seconds = time.monotonic() - start
    metrics = dict(rollout["metrics"]) | {"perf/rollout_seconds": rollout_seconds}
    if trainer is not None:
        if args.offload_rollout:
            metrics |= wait(manager.release_memory.remote(), 600, "engines to release their memory")
        if args.offload_train:
            metrics |= trainer.call("onload", what="training ranks to move back to the GPU")[0]
        metrics |= trainer.train(rollout_id, ray.put(rollout["train_data"]))
        synced = sync_due(args, rollout_id) and not args.debug_train_only
        if synced:  # the KV cache comes back after the trainer has left the GPU: it may need the trainer's memory
            metrics |= sync_weights(args, trainer, manager, str(rollout_id + 1), take_back_cache=False)
        if args.offload_train:
            metrics |= trainer.call("offload", what="training ranks to move to CPU")[0]
        if synced and args.offload_rollout:
            metrics |= wait(manager.resume_memory.remote(["kv_cache"]), 600, "engines to take back their KV cache")
    seconds = time.monotonic() - start
    return (
        metrics
        | logged_samples(args, rollout_id, rollout)
        | {
            "perf/step_seconds": seconds,
            "perf/samples_per_s": sum(map(len, rollout["samples"])) / seconds,
            "perf/trainer_idle_seconds": rollout_seconds if trainer is not None else 0.0,
            "perf/engine_idle_seconds": seconds - rollout_seconds,
        }
    )


def overlapped_steps(args, start: int, trainer: TrainGroup, manager) -> Iterator[tuple[int, dict]]:
    """--async (train_async.py): rollout k + 1 generates while rollout k trains. The weights change only between
    rollouts (the sync waits for the rollout in flight), so rollout k + 1 is generated on the weights of step k and
    trained at step k + 1: one step stale. The manager keeps a rollout generated ahead until it is trained, so a
    checkpoint taken meanwhile holds it."""
    pending = manager.generate.remote(start)
    last_end = time.time()
    previous_train = (last_end, last_end)  # (start, end) wall times of the last training, to measure the overlap
    for rollout_id in range(start, args.num_rollout):
        begin = step_start = time.monotonic()
        rollout = wait_rollout(args, manager, pending, rollout_id)
        trainer_idle = time.monotonic() - begin
        generated = rollout["generated"]
        nxt = rollout_id + 1
        pending = manager.generate.remote(nxt) if nxt < args.num_rollout else None
        metrics = dict(rollout["metrics"]) | {"perf/rollout_seconds": generated[1] - generated[0]}
        # the share of this rollout's generation that ran during the last training (none before the first)
        overlap = max(0.0, min(generated[1], previous_train[1]) - max(generated[0], previous_train[0]))
        metrics["perf/overlap_ratio"] = overlap / max(generated[1] - generated[0], 1e-9)
        metrics["perf/engine_idle_seconds"] = max(0.0, generated[0] - last_end)
        train_start = time.time()
        metrics |= trainer.train(rollout_id, ray.put(rollout["train_data"]))
        previous_train = (train_start, time.time())
        if sync_due(args, rollout_id):
            if pending is not None:  # never change the weights inside a rollout
                begin = time.monotonic()
                try:
                    wait_rollout(args, manager, pending, nxt, fetch=False)
                except RolloutCut as cut:  # this step trained: its metrics are logged and it is checkpointed
                    cut.trained = (rollout_id, metrics | logged_samples(args, rollout_id, rollout))
                    raise
                trainer_idle += time.monotonic() - begin
            metrics |= sync_weights(args, trainer, manager, str(nxt))
        manager.trained.remote(rollout_id)
        last_end = generated[1]
        seconds = time.monotonic() - step_start
        metrics["perf/step_seconds"] = seconds
        metrics["perf/samples_per_s"] = sum(map(len, rollout["samples"])) / seconds
        metrics["perf/trainer_idle_seconds"] = trainer_idle
        yield rollout_id, metrics | logged_samples(args, rollout_id, rollout)


def sync_due(args, rollout_id: int) -> bool:
    done = rollout_id + 1
    return done % args.update_weights_interval == 0 or done == args.num_rollout


def evaluate(args, manager, rollout_id: int) -> dict:
    result = wait(manager.eval.remote(rollout_id), args.rollout_timeout, f"evaluation at rollout {rollout_id}")
    return result["metrics"] | {SAMPLES: result.get("samples", [])}


def logged_samples(args, rollout_id: int, rollout: dict) -> dict:
    """A few of the rollout's samples for samples.jsonl, W&B and the report (--log-samples-count/-interval)."""
    if rollout_id % args.log_samples_interval:
        return {}
    return {SAMPLES: sample_records(rollout["samples"], "rollout", args.log_samples_count)}


def write_report_or_say_why(output_dir: str) -> None:
    """The run's HTML report; a report that cannot be written costs a line, never the run's result."""
    from slime.observe.report import write_report

    try:
        print(f"report: {os.path.abspath(write_report(output_dir))}")
    except Exception as exc:  # matplotlib or a damaged metrics file: the run itself has finished
        print(f"report not written ({type(exc).__name__}: {exc}); `slime report {output_dir}` retries")


def sync_weights(args, trainer: TrainGroup, manager, version: str, take_back_cache: bool = True) -> dict:
    """Push the trainer's weights to every engine as `version` (engines that died during training are restarted
    first under --use-fault-tolerance; engines that released memory take their weights back, and their KV cache
    unless `take_back_cache` is False); the manager remembers the version for later restarts."""
    if args.use_fault_tolerance:
        wait(manager.recover_engines.remote(), args.update_weight_timeout + 900, "engine recovery before weight sync")
    metrics = {}
    if args.offload_rollout:  # weights first: the sync writes into them; then the KV cache to generate with
        metrics |= wait(manager.resume_memory.remote(["weights"]), 600, "engines to take back their weights")
    metrics |= trainer.update_weights(version)
    if args.offload_rollout and take_back_cache:
        metrics |= wait(manager.resume_memory.remote(["kv_cache"]), 600, "engines to take back their KV cache")
    wait(manager.set_weight_version.remote(version), 60, "the rollout manager")
    return metrics


def resume(args, trainer: TrainGroup | None, manager) -> tuple[int, float | None]:
    """Load the newest complete checkpoint under --load into trainer and data source and push its weights to the
    engines. Returns (first rollout id to run, the checkpoint's save time); (0, None) without --load."""
    found = checkpoint.latest(args.load) if args.load else None
    first = args.start_rollout_id or 0
    if found is None:
        if not args.load:
            return first, None
        print(f"--load {args.load}: no checkpoint yet, starting from --hf-checkpoint")
        return first, 0.0  # a run killed before its first checkpoint left metrics that this start replaces
    rollout_id, folder = found
    start = time.monotonic()
    meta = wait(manager.load.remote(str(folder)), 600, f"the rollout manager to load {folder}")
    if trainer is not None:
        loaded = trainer.call("load", str(folder), what=f"training ranks to load {folder}")[0]
        if not loaded["optimizer_loaded"]:
            print(f"{folder}: no optimizer state loaded; AdamW starts fresh")
        if not args.debug_train_only:
            sync_weights(args, trainer, manager, meta["weight_version"] or str(rollout_id + 1))
    print(f"resumed from {folder} in {time.monotonic() - start:.1f}s: next rollout {rollout_id + 1}")
    return rollout_id + 1, meta["saved_at"]


def save(args, rollout_id: int, trainer: TrainGroup | None, manager) -> None:
    """Checkpoint `rollout_id` under --save (staged, then published whole), and the --save-hf export."""
    start = time.monotonic()
    staged = checkpoint.staging_dir(args.save, rollout_id)
    offloaded = trainer is not None and args.offload_train
    if offloaded:  # checkpoints are written from the GPU copies, as every other save
        trainer.call("onload", what="training ranks to move back to the GPU for the checkpoint")
    if trainer is not None:
        trainer.call("save", str(staged), what=f"training ranks to save checkpoint {rollout_id}")
    wait(manager.save.remote(str(staged), rollout_id), 600, f"the rollout manager to save checkpoint {rollout_id}")
    if args.save_hf and trainer is not None:  # before publishing: a published checkpoint always has its export
        export_start, out = time.monotonic(), args.save_hf.format(rollout_id=rollout_id)
        trainer.call("export_hf", out, what=f"training ranks to export {out}")
        print(f"exported the policy to {out} in {time.monotonic() - export_start:.1f}s")
    if offloaded:
        trainer.call("offload", what="training ranks to move to CPU")
    folder = checkpoint.commit(args.save, rollout_id, staged)
    print(f"saved {folder} in {time.monotonic() - start:.1f}s")


def log(metrics_log: MetricsLogger, step: int, metrics: dict) -> dict:
    metrics_log.log(step, metrics)
    return {k: v for k, v in metrics.items() if k != SAMPLES}


def start_ray() -> bool:
    """Join the Ray cluster this process was started in (`ray job submit`, RAY_ADDRESS), else start a private one
    on this machine. Returns whether this call started it (and so should shut it down)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
    return True


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def settled_args(argv: list[str] | None) -> Settings:
    """Flags -> settled configuration: argparse errors, --help and an occupied --output-dir before Ray starts, the
    rest once the cluster's GPUs are known."""
    args, parser = parse_flags(argv)
    claim_output_dir(args)
    start_ray()
    return settle(args, parser, cluster_gpus(), resolve_model=True)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    try:
        args = settled_args(argv)
    except OutputDirError as exc:
        print(f"slime: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)

    def on_ctrl_c(signum: int, frame: object) -> None:
        if not STEPPING.is_set() or STOP.is_set():  # starting up, or a second Ctrl-C: stop now
            raise KeyboardInterrupt
        STOP.set()
        then = "write a checkpoint and stop" if args.save else "stop"
        print(
            f"\nCtrl-C: a rollout under way is cut short (a training step under way finishes), then {then}; "
            "Ctrl-C again to stop at once",
            flush=True,
        )

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        train(args)
    except (DataError, checkpoint.CheckpointError) as exc:  # found before anything started: one line says it all
        print(f"slime: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # train() has stopped the trainer, the engines and the router on its way out
        try:
            found = checkpoint.latest(args.save) if args.save else None
        except (OSError, ValueError):
            found = None
        resume_hint = f"; the last checkpoint is {found[1]}: continue with --load {args.save}" if found else ""
        print(f"\ninterrupted: trainer, engines and router stopped{resume_hint}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
