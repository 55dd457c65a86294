"""Metrics sink: one line per step to stdout, a JSONL file and TensorBoard."""

from __future__ import annotations

import json
import os
import time
from typing import Any


class MetricsLogger:
    def __init__(self, output_dir: str, tensorboard: bool = True):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

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
