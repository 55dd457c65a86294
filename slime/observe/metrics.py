"""Metrics sink: one line per step to stdout, a JSONL file and TensorBoard."""

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

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, Any], echo: bool = True) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self._file.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if echo:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            print(f"[step {step}] {shown}", flush=True)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
