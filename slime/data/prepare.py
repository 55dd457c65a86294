"""`slime data prepare NAME OUT.jsonl`: a public dataset in slime's JSONL (`prompt` as chat messages, `label` the
final answer, `metadata` the rest), from the `datasets` library when the machine is online or from a local copy
of the dataset's own files (`--source`).

Each dataset names where it lives on the hub and how its rows become (prompt, label); the label is what the math
reward compares against (`--rm-type math`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from slime.data.dataset import DataError, _rows
from slime.rollout.rm_hub.math_utils import last_boxed


class PrepareError(ValueError):
    """A source row this dataset's converter cannot read; the message names the file, row and key."""


@dataclass(frozen=True)
class DatasetRecipe:
    hub_id: str
    hub_config: str | None
    default_split: str
    convert: Callable[[dict[str, Any]], tuple[str, str, dict[str, Any]]]  # row -> (question, label, metadata)
    about: str


def _field(row: dict[str, Any], *names: str) -> Any:
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    raise KeyError(f"none of the keys {list(names)} (the row has {sorted(row)})")


def _number(text: Any) -> str:
    """A numeric answer as the math reward reads it: thousands separators and a trailing '.0' dropped."""
    s = str(text).strip().replace(",", "")
    return s[:-2] if re.fullmatch(r"-?\d+\.0", s) else s


def _gsm8k(row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    answer = _field(row, "answer")
    if "####" not in answer:
        raise KeyError("'answer' has no '#### <number>' final line")
    return _field(row, "question"), _number(answer.rsplit("####", 1)[1]), {"solution": answer}


def _math(row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    problem, solution = _field(row, "problem"), row.get("solution", "")
    label = row.get("answer")
    if label in (None, ""):
        label = last_boxed(solution or "")
        if label is None:
            raise KeyError("no 'answer' and no \\boxed{} in 'solution'")
    meta = {k: row[k] for k in ("solution", "level", "type", "subject", "unique_id") if row.get(k) not in (None, "")}
    return problem, str(label).strip(), meta


def _mawps(row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    if "Body" in row and "Question" in row:  # the original layout: the story and the question apart
        question = f"{row['Body'].strip()} {row['Question'].strip()}"
    else:
        question = _field(row, "question", "Question", "input", "sQuestion")
    label = _number(_field(row, "result", "answer", "Answer", "target", "lSolutions"))
    meta = {k: row[k] for k in ("equation", "Equation", "lEquations", "id", "iIndex") if k in row}
    return question, label.strip("[]'\" "), meta


RECIPES: dict[str, DatasetRecipe] = {
    "gsm8k": DatasetRecipe("openai/gsm8k", "main", "train", _gsm8k, "grade-school word problems, '#### n' answers"),
    "math": DatasetRecipe(
        "EleutherAI/hendrycks_math", None, "train", _math, "competition math, the last \\boxed{} of the solution"
    ),
    "math500": DatasetRecipe("HuggingFaceH4/MATH-500", None, "test", _math, "500 MATH test problems with answers"),
    "mawps": DatasetRecipe("MU-NLPC/Calc-mawps", None, "train", _mawps, "one-step arithmetic word problems"),
}


def _read_source(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of a local JSONL or Parquet file (read as prompt data is) or a JSON list of rows."""
    if not path.endswith(".parquet"):
        with open(path) as f:
            text = f.read()
        if text.lstrip().startswith("["):
            for i, row in enumerate(json.loads(text)):
                yield f"{path} item {i}", row
            return
    for line, row in _rows(path):
        if isinstance(row, DataError):
            raise PrepareError(str(row))
        yield f"{path}:{line}", row


def _read_hub(recipe: DatasetRecipe, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as exc:
        raise PrepareError(
            f"reading {recipe.hub_id} needs the `datasets` package (pip install datasets) and a network; offline, "
            "pass the dataset's own file with --source"
        ) from exc
    try:
        ds = datasets.load_dataset(recipe.hub_id, recipe.hub_config, split=split)
    except Exception as exc:  # no network, no such split: datasets raises many types
        raise PrepareError(
            f"could not load {recipe.hub_id} split {split!r}: {exc}; pass a local file with --source"
        ) from exc
    for i, row in enumerate(ds):
        yield f"{recipe.hub_id}[{split}] row {i}", row


def convert_rows(
    name: str, rows: Iterable[tuple[str, dict[str, Any]]], prompt_suffix: str = "", limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """slime's JSONL rows from (where, source row) pairs of dataset `name`."""
    recipe = RECIPES[name]
    for count, (where, row) in enumerate(rows):
        if limit is not None and count >= limit:
            return
        if not isinstance(row, dict):
            raise PrepareError(f"{where}: expected an object, got {type(row).__name__}")
        try:
            question, label, meta = recipe.convert(row)
        except KeyError as exc:
            raise PrepareError(f"{where}: not a {name} row: {exc.args[0]}") from exc
        content = f"{question.strip()}{prompt_suffix}"
        yield {"prompt": [{"role": "user", "content": content}], "label": label, "metadata": meta}


def prepare(
    name: str, output: str, source: str | None = None, split: str | None = None, prompt_suffix: str = "",
    limit: int | None = None,
) -> int:  # fmt: skip
    """Write dataset `name` to `output` in slime's JSONL (replaced whole once complete); returns the row count."""
    if name not in RECIPES:
        raise PrepareError(f"unknown dataset {name!r}; known: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    rows = _read_source(source) if source else _read_hub(recipe, split or recipe.default_split)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    count = 0
    with open(output + ".tmp", "w") as f:
        for item in convert_rows(name, rows, prompt_suffix, limit):
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            count += 1
    os.replace(output + ".tmp", output)
    return count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="slime data prepare",
        description="Convert a public dataset into slime's JSONL: 'prompt' (chat messages), 'label' (the final "
        "answer, for --rm-type math), 'metadata'. Train with --input-key prompt --label-key label "
        "--apply-chat-template.",
        epilog="datasets: " + "; ".join(f"{k} ({r.hub_id}: {r.about})" for k, r in RECIPES.items()),
    )
    p.add_argument("name", choices=sorted(RECIPES), help="which dataset")
    p.add_argument("output", help="the JSONL file to write")
    p.add_argument(
        "--source",
        help="a local copy of the dataset in its own layout (.jsonl, .json or .parquet) instead of the hub",
    )
    p.add_argument("--split", help="the hub split to read (default: the dataset's training split; MATH-500: test)")
    p.add_argument("--prompt-suffix", default="", help="text appended to every question, e.g. an answer format")
    p.add_argument("--limit", type=int, help="write at most this many rows")
    args = p.parse_args(argv)
    try:
        n = prepare(args.name, args.output, args.source, args.split, args.prompt_suffix, args.limit)
    except (PrepareError, DataError, OSError) as exc:
        p.exit(1, f"slime data prepare: {exc}\n")
    print(f"wrote {n} rows to {args.output}")


if __name__ == "__main__":
    main()
