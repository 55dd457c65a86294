"""Metrics sink: a short line per step to stdout (`summary_line`), every metric to a JSONL file, TensorBoard and,
with --use-wandb, Weights & Biases."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any

from tqdm import tqdm

STEP_PHASES = (("rollout", "perf/rollout_seconds"), ("train", "train/seconds"), ("sync", "sync/seconds"))


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
        run_id: str = "",
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
        self._samples = open(os.path.join(output_dir, "samples.jsonl"), "a")  # noqa: SIM115 - kept open for the run
        self.run_id = run_id
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = tensorboard_dir or os.path.join(output_dir, "tensorboard")
            self._tb = SummaryWriter(tb_dir, purge_step=purge_step)
        self._wandb = wandb_run

    def log(self, step: int, metrics: dict[str, Any], echo: bool = True) -> None:
        """Every number of `metrics` to every sink; its SAMPLES entry (records from `sample_records`) to
        samples.jsonl and, one table per kind, to W&B."""
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self._file.write(json.dumps({"step": step, "time": time.time(), "run_id": self.run_id, **scalars}) + "\n")
        self._file.flush()
        records = metrics.get(SAMPLES) or []
        for r in records:
            self._samples.write(json.dumps({"step": step, "run_id": self.run_id, **r}, default=str) + "\n")
        self._samples.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars | self._wandb_tables(records), step=step)
        if echo:  # tqdm.write: above the run's progress bar, not appended to it
            tqdm.write(f"[step {step}] {summary_line(scalars)}", file=sys.stdout)
            if os.environ.get("SLIME_LOG_LEVEL", "").upper() == "DEBUG":  # every metric, as the files hold them
                tqdm.write("  " + "  ".join(f"{k}={v:.4g}" for k, v in scalars.items()), file=sys.stdout)

    @staticmethod
    def _wandb_tables(records: list[dict]) -> dict[str, Any]:
        if not records:
            return {}
        import wandb

        by_kind: dict[str, list[dict]] = {}
        for r in records:
            by_kind.setdefault(r["kind"], []).append(r)
        return {
            f"samples/{kind.replace('/', '_')}": wandb.Table(
                columns=list(SAMPLE_COLUMNS), data=[[str(r.get(c, "")) for c in SAMPLE_COLUMNS] for r in rows]
            )
            for kind, rows in by_kind.items()
        }

    def close(self) -> None:
        self._file.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            wandb.teardown()  # the service process writes the run's files; wait for it before the run returns


SAMPLES = "samples"  # the key of a metrics dict that carries sample records, not a number
SAMPLE_COLUMNS = ("prompt", "response", "reward", "label", "status", "response_length")
SAMPLE_TEXT_CHARS = 4000  # longer prompts and responses are cut in the records (the dumps keep them whole)


def sample_records(groups: list[list[Any]], kind: str, count: int) -> list[dict[str, Any]]:
    """Up to `count` samples of `groups` (slime Samples, one list per prompt) as plain records for the logs: the
    first sample of every group, then the second of every group, ..., so the records span prompts."""
    order = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]

    def text(x: Any) -> str:
        x = x if isinstance(x, str) else json.dumps(x, ensure_ascii=False, default=str)
        return x if len(x) <= SAMPLE_TEXT_CHARS else x[:SAMPLE_TEXT_CHARS] + " …"

    return [
        {
            "kind": kind,
            "prompt": text(s.prompt),
            "response": text(s.response),
            "reward": s.reward if isinstance(s.reward, int | float | None) else text(s.reward),
            "label": text(s.label) if s.label is not None else None,
            "status": getattr(s.status, "value", str(s.status)),
            "response_length": s.response_length,
        }
        for s in order[:count]
    ]


def write_run_record(args: Any) -> None:
    """<--output-dir>/run.json: the run id, when it started and the command line (a resumed run keeps the first
    start and lists its resumptions)."""
    path = os.path.join(args.output_dir, "run.json")
    now = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    record = {"run_id": args.run_id, "started": now, "command": getattr(args, "command_line", ""), "resumed": []}
    if args.load and os.path.exists(path):
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                earlier = json.load(f)
            if earlier.get("run_id") == args.run_id:
                record = earlier | {"resumed": [*earlier.get("resumed", []), now]}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


class OutputDirError(ValueError):
    """--output-dir holds an earlier run that this one would append to."""


def claim_output_dir(args: Any) -> None:
    """A new run does not write its curves after another run's: metrics.jsonl in --output-dir means an earlier run
    logged there. With --load the run continues (MetricsLogger drops what came after the checkpoint);
    --overwrite-output-dir deletes the earlier run's metrics, TensorBoard events and W&B run id; otherwise the folder
    is refused, naming both ways out."""
    metrics = os.path.join(args.output_dir, "metrics.jsonl")
    if args.load or not os.path.exists(metrics) or os.path.getsize(metrics) == 0:
        return
    if not args.overwrite_output_dir:
        with open(metrics) as f:
            steps = sum(1 for line in f if line.strip())
        raise OutputDirError(
            f"--output-dir {args.output_dir} already holds a run ({metrics}: {steps} logged steps); resume it with "
            "--load, replace it with --overwrite-output-dir, or choose another --output-dir"
        )
    os.remove(metrics)
    shutil.rmtree(tensorboard_dir(args) or os.path.join(args.output_dir, "tensorboard"), ignore_errors=True)
    for name in ("wandb_run_id", "samples.jsonl", "run.json", "report.html"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.output_dir, name))


def summary_line(m: dict[str, float]) -> str:
    """What a person watches, in one short line: reward, response length, held-out accuracy, the step's seconds
    split by phase, throughput, staleness. Metrics a step does not have are left out; metrics.jsonl, TensorBoard
    and W&B hold every one (SLIME_LOG_LEVEL=DEBUG prints them too)."""
    parts = []
    if "rollout/reward_mean" in m:
        parts.append(f"reward {m['rollout/reward_mean']:.3g}")
    if "rollout/response_len_mean" in m:
        truncated = m.get("rollout/truncated_ratio", 0.0)
        parts.append(f"len {m['rollout/response_len_mean']:.0f}" + (f" ({truncated:.0%} cut)" if truncated else ""))
    for k, v in m.items():
        if k.startswith("eval/") and k.endswith("/accuracy"):
            parts.append(f"{k.removeprefix('eval/').removesuffix('/accuracy')} {v:.1%}")
    if "perf/step_seconds" in m:
        phases = [(name, m.get(key)) for name, key in STEP_PHASES]
        split = " + ".join(f"{name} {v:.1f}" for name, v in phases if v is not None)
        parts.append(f"{m['perf/step_seconds']:.1f} s" + (f" = {split}" if split else ""))
    if "perf/samples_per_s" in m:
        parts.append(f"{m['perf/samples_per_s']:.3g} samples/s")
    if m.get("train/staleness_max"):
        parts.append(f"staleness {m['train/staleness_mean']:.2g}")
    if m.get("train/skipped_steps"):
        parts.append(f"{m['train/skipped_steps']:.0f} updates skipped")
    return " | ".join(parts) or f"{len(m)} metrics"


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
