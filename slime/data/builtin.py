"""Built-in prompt data: small arithmetic word problems, generated deterministically so demos need no download.

Spec (after `builtin:`): `arithmetic[:split][:n][:seed]`, e.g. `builtin:arithmetic:train:2000:0` or
`builtin:arithmetic:test`. Every problem is assigned to train or test by a hash of its text, so the two splits never
share a problem, whatever `n` and `seed`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

_NAMES = ["Tom", "Ana", "Liam", "Mia", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Emma", "Kai", "Sara"]
_ITEMS = ["apples", "books", "coins", "marbles", "stickers", "pencils", "cards", "shells", "cookies", "stamps"]
_TEMPLATES = {
    "+": [
        "{n} has {a} {item}. {n} gets {b} more {item}. How many {item} does {n} have now?",
        "There are {a} {item} in a box. Someone puts {b} more {item} in the box. How many {item} are in the box?",
        "{n} collected {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {n} collect in total?",
    ],
    "-": [
        "{n} has {a} {item}. {n} gives away {b} {item}. How many {item} does {n} have left?",
        "There are {a} {item} on a table. {b} {item} are taken away. How many {item} are left on the table?",
    ],
    "*": [
        "{n} has {a} bags with {b} {item} in each bag. How many {item} does {n} have?",
    ],
}
SPLITS = ("train", "test")
INSTRUCTION = "Solve the problem and give the final answer as a number."


def _problem(rng: random.Random) -> tuple[str, int]:
    op = rng.choices(["+", "-", "*"], weights=[3, 2, 1])[0]
    # Small numbers: SmolLM2-135M gets these right often enough (~20% sampled at 48 tokens) for GRPO to have a
    # signal from the first step; with two-digit operands it is ~5% and a 10-step CPU demo learns nothing reliable.
    if op == "*":
        a, b = rng.randint(2, 5), rng.randint(2, 5)
    else:
        a, b = rng.randint(2, 12), rng.randint(1, 9)
        if op == "-" and b > a:
            a, b = b, a
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    text = rng.choice(_TEMPLATES[op]).format(n=rng.choice(_NAMES), item=rng.choice(_ITEMS), a=a, b=b)
    return text, answer


def split_of(text: str) -> str:
    """Deterministic 80/20 train/test assignment by content."""
    return "test" if hashlib.sha256(text.encode()).digest()[0] < 52 else "train"


def arithmetic_rows(split: str = "train", n: int = 1000, seed: int = 0) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"builtin arithmetic split must be one of {SPLITS}, not {split!r}")
    rng = random.Random(f"arithmetic-{seed}")
    rows, seen = [], set()
    for _ in range(n * 200):
        text, answer = _problem(rng)
        if text in seen or split_of(text) != split:
            continue
        seen.add(text)
        rows.append({"prompt": f"{text} {INSTRUCTION}", "label": str(answer), "metadata": {"builtin": "arithmetic"}})
        if len(rows) == n:
            return rows
    raise ValueError(f"could only generate {len(rows)} distinct {split} problems, asked for {n}")


def generate_builtin(spec: str) -> Iterator[dict]:
    """Rows for a spec like `arithmetic:test:200:0`; keys: prompt, label, metadata."""
    name, *rest = spec.split(":")
    if name != "arithmetic":
        raise ValueError(f"unknown built-in dataset {name!r} (available: arithmetic)")
    split = rest[0] if len(rest) > 0 and rest[0] else "train"
    try:
        n = int(rest[1]) if len(rest) > 1 else (1000 if split == "train" else 200)
        seed = int(rest[2]) if len(rest) > 2 else 0
    except ValueError as exc:
        raise ValueError(f"builtin:{spec}: expected builtin:arithmetic[:split][:n][:seed] with integers") from exc
    yield from arithmetic_rows(split, n, seed)
