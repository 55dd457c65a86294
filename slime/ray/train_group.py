"""The training ranks as Ray actors: created together, called together, each call with a timeout."""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from slime.trainer.actor import TrainActor


class TrainerError(RuntimeError):
    """A training rank raised or died; the message names the rank and what the group was doing."""


class TrainGroup:
    """`world_size` TrainActor ranks joined by torch.distributed (one per GPU, or one process each on CPU)."""

    def __init__(self, args: Any, wait: bool = True):
        """Start the ranks and let them load the models; returns once loaded, or at once when not `wait` (then
        `wait_ready` before the first call)."""
        self.timeout_s = args.train_timeout
        world = args.world_size
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        remote = ray.remote(TrainActor)
        options: dict[str, Any] = {"num_cpus": 0, "num_gpus": 1 if use_gpu else 0}
        if use_gpu:  # one bundle per rank, packed onto as few nodes as possible
            self.pg = placement_group([{"GPU": 1, "CPU": 1}] * world, strategy="PACK")
            self._get([self.pg.ready()], "the placement group of the training GPUs")
        else:
            self.pg = None
        self.actors = [
            remote.options(
                **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)
                if self.pg
                else None,
            ).remote(args, r, world)
            for r in range(world)
        ]
        self._gpus = [a.gpus.remote() for a in self.actors]
        master = self.actors[0].host_store.remote()  # Ray passes its result to every rank's setup
        self._setup = [a.setup.remote(master) for a in self.actors]
        if wait:
            self.wait_ready()

    @property
    def gpus(self) -> list[tuple[str, str]]:
        """Every rank's GPUs as (Ray node id, physical GPU id), in rank order (waits for the ranks to start: only a
        layout that shares the trainer's GPUs with engines needs them before the engines start)."""
        return [g for rank in self._get(self._gpus, "training ranks to start") for g in rank]

    def wait_ready(self) -> None:
        self._get(self._setup, "training ranks to load the model")

    def _get(self, refs: list, what: str, timeout_s: float | None = None) -> list:
        """Results of one call on every rank. The first rank to fail stops the wait (the others may be blocked in a
        collective with it) with an error naming that rank and `what`."""
        index = {ref: rank for rank, ref in enumerate(refs)}
        timeout_s = timeout_s or self.timeout_s
        pending, deadline = list(refs), time.monotonic() + timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                ranks = sorted(index[r] for r in pending)
                raise TimeoutError(f"waited {timeout_s:.0f}s for {what}; ranks {ranks} did not finish")
            try:
                ray.get(done[0])
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                raise TrainerError(
                    f"training rank {index[done[0]]} failed during {what}: {type(cause).__name__}: {cause}"
                ) from exc
        return ray.get(refs)

    def call(self, method: str, *args, what: str | None = None) -> list:
        """Call `method` on every rank at once (they run collectives together); returns every rank's result."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return self._get(refs, what or f"training ranks to finish {method}")

    def train(self, rollout_id: int, data_ref) -> dict[str, float]:
        return self.call("train", rollout_id, data_ref, what=f"training on rollout {rollout_id}")[0]

    def update_weights(self, version: str) -> dict[str, float]:
        return self.call("update_weights", version, what=f"weight sync of version {version}")[0]

    def shutdown(self) -> None:
        try:  # a rank stuck in a collective with a failed one never answers: do not wait long for it
            self._get([a.shutdown.remote() for a in self.actors], "training ranks to shut down", timeout_s=10)
        except Exception:  # noqa: BLE001 - shutting down after a failure must not hide the failure
            pass
        for a in self.actors:
            ray.kill(a)
        if self.pg is not None:  # give the GPUs back, or the next group waits for them forever
            ray.util.remove_placement_group(self.pg)
