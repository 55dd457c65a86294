"""Fully asynchronous rollout (public import path, slime's `--rollout-function-path
slime.rollout.fully_async_rollout.generate_rollout_fully_async`).

A worker keeps a fixed number of groups generating at all times, across rollout boundaries: while the trainer
trains, generation goes on, and each rollout call takes the `--rollout-batch-size` groups that finished first, so no
step waits for the slowest group. Groups that finish beyond what a step takes wait in a queue for the next one.

- How far ahead: a group starts only if the step that will train it is at most N versions past the weights the
  engines serve now (N = `--max-staleness`, 1 when unset). Groups are trained in the order they finish, so the
  position of a new group behind the ones queued, generating and being collected tells its step. In the synchronous
  loop with N = 1 the engines generate the next rollout while the trainer trains; a larger N lets them run further
  ahead (more requests in flight when a rollout outlasts a training step) at the price of staler samples. Nothing
  is generated only to be dropped as too old, except partial rollouts resumed across several syncs.
- In flight: also at most `--sglang-server-concurrency` x engines groups.
- A group that comes back aborted (engines pause and abort at a weight sync or a memory release) returns to the data
  source: resumed under `--partial-rollout`, else as fresh prompts; it is never trained as it is.
- `--dynamic-sampling-filter-path` judges each finished group; rejected groups are dropped and counted.
- Groups in the queue were generated with the weights of their time: the staleness is visible in the samples'
  `weight_versions`, in `rollout/weight_version_lag` (the newest minus the oldest version of the step) and in
  `train/staleness_*`. Under `--max-staleness N` a group more than N steps old is dropped when a rollout call takes
  it, and a newer one is taken instead (`rollout/stale_dropped_groups`).
- A generate or reward function that raises (rather than failing one sample) stops the next rollout call with its
  error; a rollout call waiting on the queue logs what it waits for every 30 s.
- Evaluation runs the default rollout (`slime.rollout.sglang_rollout.generate_rollout`).

The worker runs on the rollout process's shared event loop, one per data source. A checkpoint puts the groups still
generating or queued back into the data source's buffer as fresh prompts: a resumed run generates them again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any

from slime.rollout.base_types import RolloutFnTrainOutput
from slime.rollout.scoring import reward_key
from slime.rollout.sglang_rollout import (
    begin_generation,
    check_rollout,
    filter_verdict,
    for_buffer,
    generate_and_rm_group,
    generate_rollout,
    rollout_metrics,
    sampling_params,
)
from slime.rollout.staleness import engine_version, split_stale
from slime.utils.async_utils import background_loop, run
from slime.utils.misc import load_function
from slime.utils.types import Sample

__all__ = ["AsyncRolloutWorker", "generate_rollout_fully_async"]

logger = logging.getLogger(__name__)

_workers: dict[int, AsyncRolloutWorker] = {}
_workers_lock = threading.Lock()


class AsyncRolloutWorker:
    """Keeps up to `concurrency` groups generating; finished groups wait in `completed` (oldest first)."""

    def __init__(self, args: Any, data_source: Any, concurrency: int):
        self.args = args
        self.data_source = data_source
        self.concurrency = max(1, concurrency)
        self.ahead = 1 if args.max_staleness is None else args.max_staleness
        self.next_rollout = 0  # the rollout the next finished group goes to
        self.collected = 0  # groups the rollout call under way holds already
        self.completed: collections.deque[list[Sample]] = collections.deque()
        self.generating: dict[asyncio.Task, list[Sample]] = {}  # each task's group as the data source drew it
        self.dropped: collections.Counter[str] = collections.Counter()
        self.requeued = 0
        self.error: BaseException | None = None
        self.running = False
        self._future = None
        path = args.dynamic_sampling_filter_path
        self._filter = load_function(path, "--dynamic-sampling-filter-path") if path else None

    def start(self) -> None:
        if self._future is None or self._future.done():
            self.running = True
            self._future = asyncio.run_coroutine_threadsafe(self._run(), background_loop())

    def stop(self) -> None:
        self.running = False
        if self._future is not None:
            self._future.cancel()

    def room(self) -> int:
        """How many more groups may start now without any of them being trained more than `ahead` versions after
        the weights it starts on."""
        steps = engine_version() + self.ahead + 1 - self.next_rollout
        return steps * self.args.rollout_batch_size - (self.collected + self.in_flight + len(self.completed))

    @property
    def in_flight(self) -> int:
        """Groups generating now."""
        return len(self.generating)

    def queue_size(self) -> int:
        return len(self.completed)

    def get_completed_groups(self, limit: int | None = None) -> list[list[Sample]]:
        """Take up to `limit` finished groups (all when None), oldest first."""
        out = []
        while self.completed and (limit is None or len(out) < limit):
            out.append(self.completed.popleft())
        return out

    async def _run(self) -> None:
        begin_generation(self.args)  # the generation tasks below copy this context
        params = sampling_params(self.args)
        pending: set[asyncio.Task] = set()
        try:
            while self.running:
                while len(pending) < self.concurrency and self.room() > 0:
                    groups = self.data_source.get_samples(1)
                    if not groups:
                        break
                    for group in groups:
                        fresh = for_buffer(group, partial=False)  # drawn before generation changes the samples
                        task = asyncio.create_task(generate_and_rm_group(self.args, group, params))
                        self.generating[task] = fresh
                        pending.add(task)
                if not pending:
                    await asyncio.sleep(0.5)  # the data source is empty for now (e.g. a custom one)
                    continue
                done, pending = await asyncio.wait(pending, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self.generating.pop(task, None)
                    self._finished(task.result())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced by the next rollout call, not lost in a log
            self.error = exc
            logger.exception("fully-async rollout worker stopped")
        finally:
            self.running = False
            for task in pending:
                task.cancel()

    def _finished(self, group: list[Sample]) -> None:
        if any(s.status == Sample.Status.ABORTED for s in group):
            self.data_source.add_samples([for_buffer(group, self.args.partial_rollout)])
            self.requeued += 1
            return
        # no step is waiting on this group alone, so keep_when_insufficient never applies (alive > target)
        keep, reason = filter_verdict(self._filter, self.args, group, alive=1, target=0)
        if keep:
            self.completed.append(group)
        else:
            self.dropped[reason] += 1


def unserved_groups(data_source: Any) -> list[list[Sample]]:
    """The groups a running worker drew from `data_source` that no rollout has taken (queued or generating), as
    fresh groups: a checkpoint puts them back into the data source, so a resumed run generates them again instead of
    skipping their prompts. Empty when no worker runs for it."""
    worker = _workers.get(id(data_source))
    if worker is None or worker.data_source is not data_source:
        return []

    async def snapshot() -> list[list[Sample]]:  # on the worker's loop: nothing changes while it is taken
        return [for_buffer(g, partial=False) for g in worker.completed] + list(worker.generating.values())

    return asyncio.run_coroutine_threadsafe(snapshot(), background_loop()).result(timeout=60)


def worker_for(args: Any, data_source: Any, rollout_id: int) -> AsyncRolloutWorker:
    """The running worker of `data_source`, started on first use (by rollout `rollout_id`: a resumed run's first)."""
    with _workers_lock:
        worker = _workers.get(id(data_source))
        if worker is None or worker.data_source is not data_source:
            worker = AsyncRolloutWorker(args, data_source, args.sglang_server_concurrency * args.rollout_num_engines)
            worker.next_rollout = rollout_id
            _workers[id(data_source)] = worker
        if worker.error is None:
            worker.start()
        return worker


async def _collect(worker: AsyncRolloutWorker, rollout_id: int, target: int) -> tuple[list[list[Sample]], int]:
    """`target` finished groups, oldest first, and how many were dropped on the way as older than --max-staleness
    allows (replaced by newer ones)."""
    groups: list[list[Sample]] = []
    stale_dropped = 0
    bound = None if worker.args.keep_stale_samples else worker.args.max_staleness
    start = last_log = time.monotonic()
    worker.next_rollout, worker.collected = rollout_id, 0
    while len(groups) < target:
        if worker.error is not None:
            raise RuntimeError(
                f"rollout {rollout_id}: the fully-async rollout worker stopped: {type(worker.error).__name__}: "
                f"{worker.error}"
            ) from worker.error
        fresh, stale = split_stale(worker.get_completed_groups(target - len(groups)), rollout_id, bound)
        groups += fresh
        worker.collected = len(groups)
        stale_dropped += len(stale)
        if len(groups) < target and worker.room() <= 0 and not worker.generating and not worker.completed:
            raise RuntimeError(
                f"rollout {rollout_id}: the engines serve weights of version {engine_version()}, so a group started "
                f"now would be trained more than {worker.ahead} steps after them (--max-staleness): no group can "
                "start until the next weight sync (is --update-weights-interval larger than --max-staleness + 1?)"
            )
        if len(groups) < target:
            await asyncio.sleep(0.05)
        if time.monotonic() - last_log > 30:
            last_log = time.monotonic()
            logger.info(
                "rollout %d: %d of %d groups after %.0fs, waiting on %d generating groups (%d dropped, %d aborted "
                "and requeued so far)",
                rollout_id,
                len(groups),
                target,
                last_log - start,
                worker.in_flight,
                sum(worker.dropped.values()),
                worker.requeued,
            )
    worker.next_rollout, worker.collected = rollout_id + 1, 0
    return groups, stale_dropped


def generate_rollout_fully_async(
    args: Any, rollout_id: int, data_source: Any, evaluation: bool = False
) -> RolloutFnTrainOutput:
    """`--rollout-batch-size` finished groups from the worker (started on the first call)."""
    if evaluation:
        return generate_rollout(args, rollout_id, data_source, evaluation=True)
    start = time.monotonic()
    worker = worker_for(args, data_source, rollout_id)
    groups, stale_dropped = run(_collect(worker, rollout_id, args.rollout_batch_size), timeout=args.rollout_timeout)
    groups.sort(key=lambda g: g[0].index)
    check_rollout(rollout_id, groups)
    metrics = rollout_metrics(groups, time.monotonic() - start, key=reward_key(args))
    versions = [int(v) for g in groups for s in g for v in s.weight_versions if v.isdigit()]
    metrics |= {
        "rollout/queued_groups": worker.queue_size(),
        "rollout/generating_groups": worker.in_flight,
        "rollout/requeued_groups": worker.requeued,
        "rollout/dropped_groups": sum(worker.dropped.values()),
        "rollout/weight_version_lag": (max(versions) - min(versions)) if versions else 0,
    }
    if args.max_staleness is not None:
        metrics["rollout/stale_dropped_groups"] = stale_dropped
    return RolloutFnTrainOutput(samples=groups, metrics=metrics)
