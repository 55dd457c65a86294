"""Metrics sink: one line per step to stdout, a JSONL file, TensorBoard and, with --use-wandb, Weights & Biases."""

from __future__ import annotations

import json
import os
import time
from typing import Any


class MetricsLogger:
    """`resume_after` (a checkpoint's save time) drops the JSONL lines a crashed run wrote after that checkpoint, and
    `purge_step` hides TensorBoard events from that step on, so a resumed run's curves have one point per step."""

    def __init__(
        self,
        output_dir: str,
        tensorboard: bool = True,
        resume_after: float | None = None,
        purge_step: int | None = None,
        tensorboard_dir: str | None = None,
        wandb_run: Any = None,
    ):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_after is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["time"] <= resume_after]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = tensorboard_dir or os.path.join(output_dir, "tensorboard")
            self._tb = SummaryWriter(tb_dir, purge_step=purge_step)
        self._wandb = wandb_run

    def log(self, step: int, metrics: dict[str, Any], echo: bool = True) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self._file.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if echo:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            print(f"[step {step}] {shown}", flush=True)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            wandb.teardown()  # the service process writes the run's files; wait for it before the run returns


def tensorboard_dir(args: Any) -> str | None:
    """--tb-project-name[/--tb-experiment-name], else TENSORBOARD_DIR (as slime), else None (the default folder)."""
    root = args.tb_project_name or os.environ.get("TENSORBOARD_DIR")
    if not root:
        return None
    return os.path.join(root, args.tb_experiment_name) if args.tb_experiment_name else root


def start_wandb(args: Any, resumed: bool) -> Any:
    """The W&B run of this training run (--use-wandb), or None. The run id is kept in <--output-dir>/wandb_run_id so
    a run resumed from a checkpoint keeps logging to the same W&B run."""
    if not args.use_wandb:
        return None
    import secrets

    import wandb

    mode = args.wandb_mode or os.environ.get("WANDB_MODE") or "online"
    id_file = os.path.join(args.output_dir, "wandb_run_id")
    run_id = args.wandb_run_id
    if run_id is None and resumed and os.path.exists(id_file):
        run_id = open(id_file).read().strip() or None
    if args.wandb_host:
        os.environ["WANDB_BASE_URL"] = args.wandb_host
    if args.wandb_key and mode == "online":
        wandb.login(key=args.wandb_key, host=args.wandb_host, relogin=True)
    group = args.wandb_group or "slime"
    name = f"{group}_{secrets.token_hex(3)}" if args.wandb_random_suffix else group
    config = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | list | type(None))}
    config.pop("wandb_key", None)
    try:
        run = wandb.init(
            project=args.wandb_project or "slime",
            entity=args.wandb_team,
            group=args.wandb_group,
            name=name,
            id=run_id,
            resume="allow" if run_id else None,
            mode=mode,
            dir=args.wandb_dir or args.output_dir,
            config=config,
        )
    except Exception as exc:  # wandb raises its own error types (no server, bad key, ...)
        raise RuntimeError(
            f"W&B run could not start in {mode} mode ({type(exc).__name__}: {exc}); check --wandb-key/--wandb-host, "
            "or log locally with --wandb-mode offline"
        ) from exc
    os.makedirs(args.output_dir, exist_ok=True)
    with open(id_file, "w") as f:
        f.write(run.id)
    return run
