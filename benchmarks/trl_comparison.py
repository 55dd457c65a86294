"""One GRPO step on CPU: this project's loop against TRL's GRPOTrainer, same machine, same run, same configuration.

Usage: .venv/bin/python benchmarks/trl_comparison.py --trl-python /tmp/trlvenv/bin/python [--steps 3] [--out DIR]
       [--slime-flag=--train-compute-dtype=bfloat16 ...]
The TRL side runs in a scratch virtual environment (TRL is not a dependency):
    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl==1.16.0

Configuration (both sides): SmolLM2-135M-Instruct (the embedded model, converted by this project), float32 weights,
16 prompts x 4 samples per step, <= 64 new tokens at temperature 0.8, one optimizer step of 64 samples, lr 1e-6,
no KL term, small arithmetic word problems answered in \\boxed{} (builtin:arithmetic), 2 threads. TRL: plain
transformers generate, per-device batch 16 x 4 accumulation steps. This project: the default loop (engine and
trainer as separate processes), --use-rollout-logprobs, token-packed micro-batches, plus any --slime-flag.
The first step of each side is a warm-up and is not counted; the figure is the mean of the others. Writes
OUT/trl_comparison.json and exits non-zero when this project's step is not at least TARGET x faster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET = 3.0
PROMPTS, SAMPLES, NEW_TOKENS, LR = 16, 4, 64, 1e-6
INSTRUCTION = "Put the final answer in \\boxed{}."

TRL_SIDE = r"""
import json, re, sys, time, torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

model, data, out, steps, prompts, samples, new_tokens, lr = sys.argv[1:9]
torch.set_num_threads(2)
rows = [json.loads(x) for x in open(data)]
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "label": r["label"]} for r in rows])

def boxed_reward(completions, label, **_):
    found = [re.findall(r"\\boxed\{([^}]*)\}", c[0]["content"]) for c in completions]
    return [1.0 if f and f[-1].strip() == l else 0.0 for f, l in zip(found, label)]

ends = []
class StepTimes(TrainerCallback):
    def on_train_begin(self, *a, **k): ends.append(time.perf_counter())
    def on_step_end(self, *a, **k): ends.append(time.perf_counter())

config = GRPOConfig(
    output_dir=out, per_device_train_batch_size=int(prompts), gradient_accumulation_steps=int(samples),
    num_generations=int(samples), max_completion_length=int(new_tokens), temperature=0.8, learning_rate=float(lr),
    beta=0.0, max_steps=int(steps), logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
    bf16=False, seed=0, dataloader_num_workers=0,
)
trainer = GRPOTrainer(model=model, reward_funcs=boxed_reward, args=config, train_dataset=ds, callbacks=[StepTimes()])
trainer.train()
print("STEP_SECONDS", json.dumps([b - a for a, b in zip(ends, ends[1:])]))
"""


def write_data(path: Path) -> None:
    from slime.data.builtin import INSTRUCTION as PLAIN
    from slime.data.builtin import arithmetic_rows

    with open(path, "w") as f:
        for r in arithmetic_rows("train", 200, 0):
            f.write(json.dumps({"prompt": r["prompt"].replace(PLAIN, INSTRUCTION), "label": r["label"]}) + "\n")


def trl_steps(python: str, model: str, data: Path, out: Path, steps: int) -> list[float]:
    script = out / "trl_side.py"
    script.write_text(TRL_SIDE)
    argv = [python, str(script), model, str(data), str(out / "trl"), str(steps)]
    argv += [str(x) for x in (PROMPTS, SAMPLES, NEW_TOKENS, LR)]
    run = subprocess.run(argv, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "2"})
    (out / "trl.log").write_text(run.stdout + run.stderr)
    lines = [x for x in run.stdout.splitlines() if x.startswith("STEP_SECONDS ")]
    if run.returncode or not lines:
        raise RuntimeError(f"TRL side failed (log: {out / 'trl.log'}):\n{run.stderr[-3000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def slime_steps(model: str, data: Path, out: Path, steps: int, extra: list[str]) -> list[dict]:
    run_dir = out / "slime"
    argv = [sys.executable, "-m", "slime.train", "--hf-checkpoint", model, "--prompt-data", str(data)]
    argv += ["--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--rm-type", "math"]
    argv += ["--rollout-batch-size", str(PROMPTS), "--n-samples-per-prompt", str(SAMPLES)]
    argv += ["--rollout-max-response-len", str(NEW_TOKENS), "--rollout-temperature", "0.8"]
    argv += ["--global-batch-size", str(PROMPTS * SAMPLES), "--num-rollout", str(steps), "--lr", str(LR)]
    argv += [
        "--use-rollout-logprobs",
        "--use-dynamic-batch-size",
        "--output-dir",
        str(run_dir),
        "--overwrite-output-dir",
    ]
    argv += extra
    run = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    (out / "slime.log").write_text(run.stdout + run.stderr)
    if run.returncode:
        raise RuntimeError(f"slime side failed (log: {out / 'slime.log'}):\n{run.stderr[-3000:]}")
    return [json.loads(x) for x in open(run_dir / "metrics.jsonl")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl-python", required=True, help="python of a virtual environment with trl==1.16.0 installed")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps per side (the first is a warm-up)")
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    p.add_argument("--slime-flag", action="append", default=[], help="an extra flag for this project's side")
    a = p.parse_args()
    from slime.hub.provision import resolve_checkpoint

    out = Path(a.out or tempfile.mkdtemp(prefix="trl-comparison-"))
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_checkpoint("SmolLM2-135M-Instruct")
    data = out / "arithmetic_boxed.jsonl"
    write_data(data)
    extra = [x for f in a.slime_flag for x in f.split("=", 1)]
    start = time.perf_counter()
    ours = slime_steps(model, data, out, a.steps, extra)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = trl_steps(a.trl_python, model, data, out, a.steps)
    theirs_s = time.perf_counter() - start
    keys = ("perf/step_seconds", "perf/rollout_seconds", "train/seconds", "sync/seconds", "train/tokens_per_s")
    our_steps = [{k: s.get(k) for k in keys} | {"reward": s.get("rollout/reward_mean")} for s in ours]
    ours_mean = sum(s["perf/step_seconds"] for s in ours[1:]) / max(1, len(ours) - 1)
    theirs_mean = sum(theirs[1:]) / max(1, len(theirs) - 1)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
        "cpu": os.cpu_count(),
        "slime_flags": extra,
        "slime_steps": our_steps,
        "slime_step_seconds": ours_mean,
        "slime_wall_seconds": ours_s,
        "trl_step_seconds_each": theirs,
        "trl_step_seconds": theirs_mean,
        "trl_wall_seconds": theirs_s,
        "speedup": theirs_mean / ours_mean,
        "target": TARGET,
    }
    (out / "trl_comparison.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["speedup"] >= TARGET else 1)


if __name__ == "__main__":
    main()
