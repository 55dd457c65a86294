"""Where a rollout gets its prompt groups (public import path; `--data-source-path` picks the class).

`RolloutDataSourceWithBuffer(args)` is the default: prompts from `--prompt-data` in (optionally shuffled) epochs,
with a buffer of groups handed back by the rollout (aborted by dynamic sampling, or partial under
`--partial-rollout`) that is served first, through `--buffer-filter-path`. A custom data source is any class built
as `cls(args)` with `get_samples(num_prompts) -> list[list[Sample]]`, `add_samples(groups)` and `__len__`.
Eval datasets are not a data source's business: `eval_groups(args)` builds them from `args.eval_datasets`.
"""

from __future__ import annotations

import abc
import copy
import random
from typing import Any

from slime.data.dataset import PromptDataset, load_prompt_data
from slime.utils.misc import load_function
from slime.utils.processing_utils import load_tokenizer
from slime.utils.types import Sample

_STATE_KEYS = ("epoch", "offset", "sample_index", "group_index")


class DataSource(abc.ABC):
    """The interface the rollout manager and rollout functions rely on."""

    rollout_id: int | None = None  # the rollout being generated (set by the manager through begin_rollout)

    def begin_rollout(self, rollout_id: int) -> None:
        """Called by the rollout manager before each training rollout (optional for custom data sources)."""
        self.rollout_id = rollout_id

    @abc.abstractmethod
    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        """`num_prompts` groups of `--n-samples-per-prompt` samples each."""

    @abc.abstractmethod
    def add_samples(self, groups: list[list[Sample]]) -> None:
        """Take groups back (e.g. aborted ones) to serve them again."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Prompts in the underlying dataset (0 when there is none)."""


def _load_kwargs(args: Any) -> dict[str, Any]:
    return dict(
        tokenizer=load_tokenizer(args.hf_checkpoint),
        apply_chat_template=args.apply_chat_template,
        apply_chat_template_kwargs=args.apply_chat_template_kwargs,
        max_prompt_len=args.rollout_max_prompt_len,
        skip_invalid=args.skip_invalid_data_rows,
    )


def _row_keys(source: Any) -> dict[str, Any]:
    """The row keys load_prompt_data takes, from the flags or from one eval dataset's settings (same names)."""
    return {k: getattr(source, k) for k in ("input_key", "label_key", "metadata_key", "tool_key")}


def training_prompts(args: Any) -> PromptDataset:
    """`--prompt-data` as the flags read it (keys, template, length filter)."""
    return load_prompt_data(args.prompt_data, **_load_kwargs(args), **_row_keys(args))


def check_prompt_files(args: Any) -> None:
    """Read --prompt-data and every eval dataset once, row by row, as the rollout manager will (keys, types; no
    tokenizer): a broken row fails the run in seconds with one line naming file, line and key, not after Ray,
    trainer and engines have started. Built-in generators and custom data sources (their own formats) are left
    to themselves."""
    skip = args.skip_invalid_data_rows
    ours = args.data_source_path.startswith(f"{__name__}.")
    if ours and args.rollout_global_dataset and args.prompt_data and not args.prompt_data.startswith("builtin:"):
        load_prompt_data(args.prompt_data, None, skip_invalid=skip, **_row_keys(args))
    for cfg in args.eval_datasets or []:
        if not cfg.path.startswith("builtin:"):
            load_prompt_data(cfg.path, None, skip_invalid=skip, max_rows=cfg.max_prompts, **_row_keys(cfg))


class RolloutDataSource(DataSource):
    """Cycles through `--prompt-data`; each epoch is reshuffled with `--rollout-seed` + epoch under
    `--rollout-shuffle`. With `--disable-rollout-global-dataset` there is no dataset and asking for prompts fails.
    `dataset` overrides loading from the flags (tests, embedding)."""

    def __init__(self, args: Any, dataset: PromptDataset | None = None):
        self.args = args
        if dataset is None and args.rollout_global_dataset:
            dataset = training_prompts(args)
        self.dataset = dataset
        self.epoch, self.offset, self.sample_index, self.group_index = 0, 0, 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self)))
        if self.args.rollout_shuffle:
            random.Random(self.args.rollout_seed + self.epoch).shuffle(order)
        return order

    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        """`num_prompts` groups of fresh copies of the next prompts, numbered on from the last group."""
        if num_prompts and self.dataset is None:
            raise RuntimeError(
                "no prompt dataset (--disable-rollout-global-dataset): the rollout function must "
                "bring its own prompts instead of calling data_source.get_samples"
            )
        groups = []
        for _ in range(num_prompts):
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order()
            prompt = self.dataset.samples[self._order[self.offset]]
            self.offset += 1
            group = []
            for _ in range(self.args.n_samples_per_prompt):
                s = copy.deepcopy(prompt)
                s.group_index, s.index = self.group_index, self.sample_index
                self.sample_index += 1
                group.append(s)
            self.group_index += 1
            groups.append(group)
        return groups

    def add_samples(self, groups: list[list[Sample]]) -> None:
        raise RuntimeError(
            f"{type(self).__name__} has no buffer; use RolloutDataSourceWithBuffer (the default "
            "--data-source-path) to hand groups back"
        )

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else 0

    def state_dict(self) -> dict[str, Any]:
        """Where the prompt order stands (for checkpoints)."""
        return {k: getattr(self, k) for k in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next group is the next unseen prompt of the same order."""
        if sorted(state) != sorted(_STATE_KEYS):
            raise ValueError(f"data source state has keys {sorted(state)}, expected {sorted(_STATE_KEYS)}")
        for k in _STATE_KEYS:
            setattr(self, k, int(state[k]))
        self._order = self._epoch_order()


class RolloutDataSourceWithBuffer(RolloutDataSource):
    """`RolloutDataSource` plus a buffer of handed-back groups, served before new prompts. Which buffered groups
    come out, and in what order, is `--buffer-filter-path` (default `pop_first`)."""

    def __init__(self, args: Any, dataset: PromptDataset | None = None):
        super().__init__(args, dataset)
        self.buffer: list[list[Sample]] = []
        path = getattr(args, "buffer_filter_path", None)
        self.buffer_filter = load_function(path, "--buffer-filter-path") if path else pop_first

    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        if self.buffer and num_prompts:
            groups = self.buffer_filter(self.args, self.rollout_id, self.buffer, num_prompts)
        else:
            groups = []
        if not isinstance(groups, list) or len(groups) > num_prompts:
            raise ValueError(
                f"--buffer-filter-path returned {len(groups) if isinstance(groups, list) else groups!r} "
                f"groups for a request of {num_prompts}"
            )
        return groups + super().get_samples(num_prompts - len(groups))

    def add_samples(self, groups: list[list[Sample]]) -> None:
        n = self.args.n_samples_per_prompt
        for g in groups:
            if not isinstance(g, list) or len(g) != n:
                raise ValueError(
                    f"add_samples takes groups of --n-samples-per-prompt {n} samples, got "
                    f"{len(g) if isinstance(g, list) else type(g).__name__}"
                )
        self.buffer.extend(groups)

    def get_buffer_length(self) -> int:
        return len(self.buffer)

    def state_dict(self) -> dict[str, Any]:
        """The prompt position and the buffered groups (partial responses included), for checkpoints."""
        return super().state_dict() | {"buffer": [[s.to_dict() for s in g] for g in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.buffer = [[Sample.from_dict(s) for s in g] for g in state.pop("buffer", [])]
        super().load_state_dict(state)


def pop_first(args: Any, rollout_id: int | None, buffer: list[list[Sample]], num_samples: int) -> list[list[Sample]]:
    """The default buffer filter: the oldest `num_samples` groups, removed from the buffer."""
    out = buffer[:num_samples]
    del buffer[:num_samples]
    return out


_EVAL_CACHE: dict[tuple, PromptDataset] = {}


def eval_groups(args: Any) -> dict[str, list[list[Sample]]]:
    """{eval dataset name: one group of `n_samples_per_eval_prompt` fresh samples per prompt, in file order}, for
    every entry of `args.eval_datasets`. Files are read once per process."""
    out = {}
    for cfg in args.eval_datasets:
        key = (cfg.name, cfg.path, cfg.input_key, cfg.label_key, cfg.metadata_key, cfg.tool_key, cfg.max_prompts)
        key += (cfg.max_prompt_len,)
        if key not in _EVAL_CACHE:
            _EVAL_CACHE[key] = load_prompt_data(
                cfg.path,
                **(_load_kwargs(args) | {"max_prompt_len": cfg.max_prompt_len}),
                **_row_keys(cfg),
                max_rows=cfg.max_prompts,
            )
        n, groups = cfg.n_samples_per_eval_prompt, []
        for g, s in enumerate(_EVAL_CACHE[key].samples):
            meta = cfg.inject_metadata(s.metadata)
            groups.append(
                [
                    Sample(prompt=s.prompt, label=s.label, metadata=dict(meta), group_index=g, index=g * n + k)
                    for k in range(n)
                ]
            )
        out[cfg.name] = groups
    return out
