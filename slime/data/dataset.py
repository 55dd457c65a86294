"""Prompt datasets: JSONL and Parquet files, or a built-in generator, turned into `Sample`s.

Each row needs the prompt under `--input-key` (a string, or a list of chat messages when `--apply-chat-template`
is set), optionally a label under `--label-key` and a dict under `--metadata-key`. A bad row raises `DataError`
naming file, line and key; with `skip_invalid=True` it is skipped and counted instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slime.utils.types import Sample

logger = logging.getLogger(__name__)
BUILTIN_PREFIX = "builtin:"


class DataError(ValueError):
    pass


@dataclass
class PromptDataset:
    samples: list[Sample]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped

    def __len__(self) -> int:
        return len(self.samples)


def _rows(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) for JSONL or Parquet; a built-in spec yields generated rows."""
    if path.startswith(BUILTIN_PREFIX):
        from slime.data.builtin import generate_builtin

        yield from enumerate(generate_builtin(path[len(BUILTIN_PREFIX) :]), start=1)
        return
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist(), start=1):
            yield i, row
        return
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                yield i, DataError(f"{path}:{i}: invalid JSON ({exc.msg} at column {exc.colno})")


def _prompt_tokens(tokenizer: Any, prompt: str | list[dict], tools: Any) -> int:
    if isinstance(prompt, str):
        return len(tokenizer.encode(prompt, add_special_tokens=False))
    return len(tokenizer.apply_chat_template(prompt, tools=tools, tokenize=True, return_dict=False))


def load_prompt_data(
    path: str,
    tokenizer: Any,
    input_key: str = "input",
    label_key: str | None = None,
    metadata_key: str | None = "metadata",
    tool_key: str | None = None,
    apply_chat_template: bool = False,
    apply_chat_template_kwargs: dict | None = None,
    max_prompt_len: int | None = None,
    skip_invalid: bool = False,
    max_rows: int | None = None,
) -> PromptDataset:
    """Read every row of `path` (the first `max_rows` usable ones when set) into a Sample with `prompt` (templated
    text), `label` and `metadata` set. Without a `tokenizer` the rows are only checked: no chat template, no length
    filter (how a run checks its data before anything starts)."""
    samples: list[Sample] = []
    skipped: dict[str, int] = {}

    def reject(line: int, msg: str, reason: str) -> None:
        if not skip_invalid:
            raise DataError(f"{path}:{line}: {msg}")
        skipped[reason] = skipped.get(reason, 0) + 1

    for line, row in _rows(path):
        if max_rows is not None and len(samples) >= max_rows:
            break
        if isinstance(row, DataError):
            if not skip_invalid:
                raise row
            skipped["invalid_json"] = skipped.get("invalid_json", 0) + 1
            continue
        if not isinstance(row, dict):
            reject(line, f"row is a {type(row).__name__}, expected a JSON object", "not_an_object")
            continue
        if input_key not in row:
            reject(line, f"missing key {input_key!r} (--input-key); row has {sorted(row)}", "missing_input_key")
            continue
        prompt = row[input_key]
        if isinstance(prompt, str):
            if not prompt.strip():
                reject(line, f"key {input_key!r} is an empty prompt", "empty_prompt")
                continue
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
            messages = prompt
        else:
            what = "an empty list" if prompt == [] else f"a {type(prompt).__name__}"
            reject(line, f"key {input_key!r} is {what}; expected a string or a list of chat messages", "bad_prompt")
            continue
        label = None
        if label_key:
            if label_key not in row:
                reject(line, f"missing key {label_key!r} (--label-key)", "missing_label_key")
                continue
            label = row[label_key]
            if isinstance(label, int | float) and not isinstance(label, bool):
                label = str(label)
            if not isinstance(label, str | dict | list):
                reject(line, f"key {label_key!r} is a {type(label).__name__}", "bad_label")
                continue
        metadata = row.get(metadata_key) if metadata_key else None
        if isinstance(metadata, str):
            try:
                metadata = json.loads(metadata)
            except json.JSONDecodeError:
                metadata = None
        if metadata is not None and not isinstance(metadata, dict):
            reject(line, f"key {metadata_key!r} is a {type(metadata).__name__}, expected an object", "bad_metadata")
            continue
        metadata = dict(metadata or {})
        tools = row.get(tool_key) if tool_key else metadata.get("tools")
        if tools is not None:  # generate functions and the SFT rollout read them here, as in slime
            metadata.setdefault("tools", tools)
        if apply_chat_template and tokenizer is not None:
            text = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **(apply_chat_template_kwargs or {})
            )
        else:  # chat messages stay messages: for a generate function (or the SFT rollout) that renders them
            text = prompt
        check_length = max_prompt_len is not None and tokenizer is not None
        if check_length and _prompt_tokens(tokenizer, text, tools) > max_prompt_len:
            skipped["over_max_prompt_len"] = skipped.get("over_max_prompt_len", 0) + 1
            continue
        metadata.setdefault("source_line", line)
        samples.append(Sample(prompt=text, label=label, metadata=metadata))
    if not samples:
        raise DataError(f"{path}: no usable rows (skipped: {skipped or 'none'})")
    if skipped:
        logger.warning("%s: skipped %d rows: %s", path, sum(skipped.values()), skipped)
    return PromptDataset(samples, path, skipped)
