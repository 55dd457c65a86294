"""Host cost of the paged engine's continuous decode steps, with the model stubbed out (CPU).

Usage: .venv/bin/python benchmarks/engine_host_overhead.py [ROWS] [NEW_TOKENS] [STEPS]   (default 256 256 8)
Every request samples inside the step, so the engine runs continuous steps (`--num-continuous-decode-steps`); the
model's decode body returns fixed tokens at once and prefill does nothing, so what is timed is the engine's own
bookkeeping per step (launching, reading tokens back, appending them, stop checks, reservations). On a GPU this
work overlaps the next step, so it is hidden as long as it stays under the GPU's step time.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_tiny_llama  # noqa: E402

from slime.engine.paged import PagedEngine  # noqa: E402
from slime.engine.sampling import SamplingParams  # noqa: E402
from slime.hub.provision import resolve_checkpoint  # noqa: E402


def main() -> None:
    rows, new, steps = (int(a) for a in (sys.argv[1:] + ["256", "256", "8"][len(sys.argv) - 1 :]))
    path = build_tiny_llama(resolve_checkpoint("SmolLM2-135M-Instruct"), tempfile.mkdtemp())
    engine = PagedEngine(path, block_size=16, max_running_requests=rows, kv_cache_tokens=rows * (new + 160),
                         max_prefill_tokens=16384, decode_steps=steps)  # fmt: skip
    toks, lps, logits = torch.randint(100, 1000, (rows,)), torch.zeros(rows), torch.zeros(rows, 1)
    engine.runner._decode_body = lambda b: (logits[:b], toks[:b], lps[:b])
    engine.runner.prefill = lambda *a, **k: None
    done, out = threading.Event(), []

    def finished(r) -> None:
        out.append(r)
        if len(out) == rows:
            done.set()

    engine.pause("in_place")  # all admitted together
    for i in range(rows):
        prompt = torch.randint(10, 2000, (128,)).tolist()
        engine.submit(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True), finished, rid=str(i))
    engine.resume()
    assert done.wait(600), "engine did not finish"
    engine.shutdown()
    s = engine.stats
    print(f"{rows} rows, {steps} continuous steps: {1e3 * s['decode_seconds'] / s['decode_steps']:.2f} ms of host "
          f"work per decode step ({s['decode_steps']} steps)")  # fmt: skip


if __name__ == "__main__":
    main()
