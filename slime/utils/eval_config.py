"""Evaluation datasets: from `--eval-prompt-data NAME PATH …` or an `--eval-config` YAML, with per-dataset overrides.

The YAML (slime's layout):

    eval:
      defaults:                 # any dataset field below; applies where a dataset leaves it unset
        n_samples_per_eval_prompt: 4
        temperature: 0.6
      datasets:                 # a list of entries with `name`, or a mapping name -> entry
        - name: gsm8k
          path: data/gsm8k_test.jsonl
          rm_type: math
          label_key: label
          max_prompts: 200

A field left unset in both falls back to the command line: `--eval-*` flags, then the rollout's.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any


class EvalConfigError(ValueError):
    pass


@dataclass
class EvalDatasetConfig:
    name: str
    path: str
    rm_type: str | None = None  # stored as each sample's metadata["rm_type"] (below --custom-rm-path in priority)
    input_key: str | None = None  # slime's YAML calls it prompt_key; both are read
    label_key: str | None = None
    tool_key: str | None = None
    metadata_key: str | None = None
    n_samples_per_eval_prompt: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_response_len: int | None = None
    min_new_tokens: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_prompts: int | None = None  # the first N prompts only
    max_prompt_len: int | None = None  # prompts longer than this (tokens) are dropped
    custom_generate_function_path: str | None = None
    custom_rm_path: str | None = None  # this dataset's reward function (stored as metadata["custom_rm_path"])
    metadata_overrides: dict[str, Any] = field(default_factory=dict)

    def inject_metadata(self, metadata: dict) -> dict:
        out = dict(metadata)
        if self.rm_type is not None:
            out["rm_type"] = self.rm_type
        if self.custom_rm_path is not None:
            out["custom_rm_path"] = self.custom_rm_path
        return out | self.metadata_overrides


FIELDS = {f.name for f in dataclasses.fields(EvalDatasetConfig)}
ALIASES = {"prompt_key": "input_key"}
CLI_FALLBACK = {  # dataset field -> the args attributes tried in order
    "input_key": ("eval_input_key", "input_key"),
    "label_key": ("eval_label_key", "label_key"),
    "tool_key": ("eval_tool_key", "tool_key"),
    "max_prompt_len": ("eval_max_prompt_len",),
    "min_new_tokens": ("eval_min_new_tokens",),
    "metadata_key": ("metadata_key",),
    "n_samples_per_eval_prompt": ("n_samples_per_eval_prompt",),
    "temperature": ("eval_temperature", "rollout_temperature"),
    "top_p": ("eval_top_p", "rollout_top_p"),
    "top_k": ("eval_top_k", "rollout_top_k"),
    "max_response_len": ("eval_max_response_len", "rollout_max_response_len"),
    "stop": ("rollout_stop",),
    "stop_token_ids": ("rollout_stop_token_ids",),
    "max_prompts": ("eval_max_prompts",),
}


def _entry(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise EvalConfigError(f"{where}: expected a mapping of dataset fields, got {type(raw).__name__}")
    entry = {ALIASES.get(k, k): v for k, v in raw.items()}
    unknown = sorted(set(entry) - FIELDS)
    if unknown:
        raise EvalConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(FIELDS | set(ALIASES))}")
    return entry


def read_eval_config(path: str) -> list[dict[str, Any]]:
    """The YAML's dataset entries with `eval.defaults` applied; errors name the file and the entry."""
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise EvalConfigError(f"--eval-config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise EvalConfigError(f"--eval-config {path}: invalid YAML: {exc}") from exc
    section = doc.get("eval", doc) if isinstance(doc, dict) else None
    if not isinstance(section, dict) or "datasets" not in section:
        raise EvalConfigError(f"--eval-config {path}: expected `eval: {{datasets: [...]}}` at the top")
    defaults = _entry(section.get("defaults") or {}, f"{path}: eval.defaults")
    datasets = section["datasets"]
    if isinstance(datasets, dict):
        datasets = [{"name": name, **(cfg or {})} for name, cfg in datasets.items()]
    if not isinstance(datasets, list) or not datasets:
        raise EvalConfigError(f"{path}: eval.datasets must be a non-empty list or mapping")
    out = []
    for i, raw in enumerate(datasets):
        entry = _entry(raw, f"{path}: eval.datasets[{i}]")
        for key in ("name", "path"):
            if not entry.get(key):
                raise EvalConfigError(f"{path}: eval.datasets[{i}] has no {key!r}")
        merged = copy.deepcopy(defaults)
        merged.update({k: v for k, v in entry.items() if v is not None})
        out.append(merged)
    return out


def eval_dataset_configs(args: Any) -> list[EvalDatasetConfig]:
    """Every eval dataset: the `--eval-config` entries, then the `--eval-prompt-data` pairs; unset fields from flags."""
    entries = read_eval_config(args.eval_config) if getattr(args, "eval_config", None) else []
    pairs = getattr(args, "eval_prompt_data", None) or []
    entries += [{"name": n, "path": p} for n, p in zip(pairs[::2], pairs[1::2], strict=True)]
    names = [e["name"] for e in entries]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise EvalConfigError(f"eval dataset name(s) {duplicated} used twice (--eval-config / --eval-prompt-data)")
    return [resolve(args, entry) for entry in entries]


def resolve(args: Any, entry: dict[str, Any]) -> EvalDatasetConfig:
    """One dataset's config with every field the entry leaves unset taken from the flags (CLI_FALLBACK)."""
    entry = dict(entry)
    for name, attrs in CLI_FALLBACK.items():
        if entry.get(name) is None:
            entry[name] = next((getattr(args, a) for a in attrs if getattr(args, a, None) is not None), None)
    try:
        return EvalDatasetConfig(**entry)
    except TypeError as exc:
        raise EvalConfigError(f"eval dataset {entry['name']!r}: {exc}") from exc
