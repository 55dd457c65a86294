"""Reward grading speed: 10k gradings per built-in type on responses built from GSM8K train solutions.

Half of each type's responses carry the right answer and half a perturbed one (math-verify's slow path is the
mismatch). Each grading is timed alone in this process, the way the rollout calls it in a worker thread; the last
rows time 10k math gradings through `batched_async_rm` (threads, all at once) and the pathological inputs.

    .venv/bin/python benchmarks/reward_speed.py [--data ../shared/data/gsm8k/train.jsonl] [--n 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from types import SimpleNamespace

from slime.rollout.rm_hub import async_rm, batched_async_rm, builtin_rm
from slime.utils.types import Sample

IFEVAL = {
    "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words", "keywords:existence"],
    "kwargs": [{}, {"num_words": 40, "relation": "at least"}, {"keywords": ["total"]}],
}


def cases(rows: list[dict], n: int, seed: int = 0) -> dict[str, list[Sample]]:
    rng = random.Random(seed)
    out: dict[str, list[Sample]] = {k: [] for k in ("math", "math_long", "deepscaler", "dapo", "f1", "gpqa", "ifeval")}
    for i in range(n):
        row = rows[i % len(rows)]
        body, label = row["metadata"]["solution"].rsplit("####", 1)[0].strip(), row["label"]
        answer = label if i % 2 == 0 else str(float(label) + rng.choice([-1, 1, 0.5]))
        letter, gold = rng.choice("ABCD"), rng.choice("ABCD")
        out["math"].append(Sample(response=f"{body}\nThe answer is $\\boxed{{{answer}}}$.", label=label))
        reasoning = (body + "\n") * max(1, 2000 // max(len(body), 1))  # ~2 kB, a typical model response
        out["math_long"].append(Sample(response=f"{reasoning}So the total is {answer}.", label=label))
        out["deepscaler"].append(Sample(response=f"<think>{body}</think> \\boxed{{{answer}}}", label=label))
        out["dapo"].append(Sample(response=f"{body}\nAnswer: {answer}", label=label))
        out["f1"].append(Sample(response=f"The total is {answer} dollars", label=f"{label} dollars"))
        out["gpqa"].append(Sample(response=f"{body}\nThe answer is ({letter}).", label=gold))
        out["ifeval"].append(Sample(response=body, label=IFEVAL))
    return out


def time_each(rm_type: str, samples: list[Sample]) -> dict:
    grade, args = builtin_rm(rm_type.removesuffix("_long")), SimpleNamespace()
    ms = []
    for s in samples:
        t0 = time.perf_counter()
        grade(args, s)
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    return {
        "type": rm_type,
        "gradings": len(ms),
        "mean_ms": statistics.fmean(ms),
        "p50_ms": ms[len(ms) // 2],
        "p99_ms": ms[int(len(ms) * 0.99)],
        "max_ms": ms[-1],
    }


def time_batched(samples: list[Sample]) -> dict:
    args = SimpleNamespace(rm_type="math", custom_rm_path=None)
    t0 = time.perf_counter()
    asyncio.run(batched_async_rm(args, samples))
    total = time.perf_counter() - t0
    return {"type": "math via batched_async_rm", "gradings": len(samples), "mean_ms": total * 1e3 / len(samples)}


def time_pathological() -> list[dict]:
    args = SimpleNamespace(rm_type="math", custom_rm_path=None)
    inputs = {
        "100 kB of digits and words": ("the answer is 12 " * 6000)[:100_000],
        "100 kB of nested braces": "\\boxed{" + "{" * 50_000 + "1" + "}" * 50_000 + "}",
        "100 kB, one 400+ char box": "x " * 49_000 + "\\boxed{" + "1+" * 1000 + "1}",
    }
    out = []
    for name, response in inputs.items():
        t0 = time.perf_counter()
        asyncio.run(async_rm(args, Sample(response=response, label="12")))
        out.append({"type": f"math, {name}", "gradings": 1, "mean_ms": (time.perf_counter() - t0) * 1e3})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/gsm8k/train.jsonl", help="slime-format JSONL with solutions")
    p.add_argument("--n", type=int, default=10_000, help="gradings per type")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.data)]
    results = [time_each(t, s) for t, s in cases(rows, a.n).items()]
    results.append(time_batched(cases(rows, a.n)["math"]))
    results.extend(time_pathological())
    print("| type | gradings | mean ms | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r[k]:.3f}" if k in r else "" for k in ("mean_ms", "p50_ms", "p99_ms", "max_ms")]
        print(f"| {r['type']} | {r['gradings']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
