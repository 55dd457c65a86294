"""The synchronous RL loop: rollout -> (train -> sync) -> eval. Entry point of `slime-train` and `train.py`."""

from __future__ import annotations

import logging
import os
import sys

import ray
from tqdm import tqdm

from slime.config.arguments import parse_args
from slime.models.provision import resolve_checkpoint
from slime.observe.metrics import MetricsLogger
from slime.rollout.manager import RolloutManager


def train(args) -> dict:
    """Run `--num-rollout` steps; returns the last rollout and eval metrics."""
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
    metrics_log = MetricsLogger(args.output_dir)
    manager = RolloutManager.options(num_cpus=0).remote(args)
    last: dict = {}
    try:
        info = ray.get(manager.info.remote())
        print(
            f"rollout: {info['num_train_prompts']} prompts, engines {info['engine_urls']} behind {info['router_url']}"
        )
        if args.eval_prompt_data and not args.skip_eval_before_train:
            last["eval_before"] = ray.get(manager.eval.remote(0))["metrics"]
            metrics_log.log(0, last["eval_before"])
        for rollout_id in tqdm(range(args.num_rollout), desc="rollout", unit="step"):
            rollout = ray.get(manager.generate.remote(rollout_id))
            last["rollout"] = rollout["metrics"]
            metrics_log.log(rollout_id, rollout["metrics"])
            if not args.debug_rollout_only:
                raise NotImplementedError("training is not available yet: run with --debug-rollout-only")
            if args.eval_interval and (rollout_id + 1) % args.eval_interval == 0:
                last["eval"] = ray.get(manager.eval.remote(rollout_id + 1))["metrics"]
                metrics_log.log(rollout_id + 1, last["eval"])
    finally:
        ray.get(manager.shutdown.remote())
        metrics_log.close()
        ray.shutdown()
    return last


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    args.hf_checkpoint = resolve_checkpoint(args.hf_checkpoint)
    train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
