"""The synchronous RL loop: rollout -> train -> weight sync -> eval. Entry point of `slime-train` and `train.py`."""

from __future__ import annotations

import logging
import os
import sys
import time

import ray
from tqdm import tqdm

from slime.config.arguments import batch_plan, parse_args
from slime.models.provision import resolve_checkpoint
from slime.observe.metrics import MetricsLogger
from slime.ray.train_group import TrainGroup
from slime.rollout.manager import RolloutManager


def train(args) -> dict:
    """Run `--num-rollout` steps; returns the last rollout, train, sync and eval metrics."""
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
    metrics_log = MetricsLogger(args.output_dir)
    manager = RolloutManager.options(num_cpus=0).remote(args)
    trainer = None
    last: dict = {}
    try:
        info = ray.get(manager.info.remote())
        print(
            f"rollout: {info['num_train_prompts']} prompts, engines {info['engine_urls']} behind {info['router_url']}"
        )
        if not args.debug_rollout_only:
            print(batch_plan(args))
            trainer = TrainGroup(args)
            trainer.call("connect_engines", info["engine_urls"])
        has_eval = bool(args.eval_datasets)
        if has_eval and not args.skip_eval_before_train:
            last["eval_before"] = log(metrics_log, 0, ray.get(manager.eval.remote(0))["metrics"])
        for rollout_id in tqdm(range(args.num_rollout), desc="rollout", unit="step", file=sys.stdout):
            step_start = time.monotonic()
            rollout = ray.get(manager.generate.remote(rollout_id))
            metrics = dict(rollout["metrics"])
            if trainer is not None:
                metrics |= trainer.train(rollout_id, ray.put(rollout["train_data"]))
                metrics |= trainer.update_weights(str(rollout_id + 1))
            metrics["perf/step_seconds"] = time.monotonic() - step_start
            last["rollout"] = log(metrics_log, rollout_id, metrics)
            done = rollout_id + 1
            if has_eval and args.eval_interval and (done % args.eval_interval == 0 or done == args.num_rollout):
                last["eval"] = log(metrics_log, done, ray.get(manager.eval.remote(done))["metrics"])
    finally:
        if trainer is not None:
            trainer.shutdown()
        ray.get(manager.shutdown.remote())
        metrics_log.close()
        ray.shutdown()
    return last


def log(metrics_log: MetricsLogger, step: int, metrics: dict) -> dict:
    metrics_log.log(step, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    args.hf_checkpoint = resolve_checkpoint(args.hf_checkpoint)
    train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
