"""The rollout data source: hands out prompt groups in (optionally shuffled) epochs, remembers its position."""

from __future__ import annotations

import copy
import random
from typing import Any

from slime.data.dataset import PromptDataset
from slime.utils.types import Sample


class RolloutDataSource:
    """Cycles through a dataset; each epoch is reshuffled with `seed + epoch` when `shuffle` is set."""

    def __init__(
        self, dataset: PromptDataset | None, n_samples_per_prompt: int = 1, shuffle: bool = False, seed: int = 42
    ):
        self.dataset, self.n_samples_per_prompt, self.shuffle, self.seed = dataset, n_samples_per_prompt, shuffle, seed
        self.epoch, self.offset, self.sample_index, self.group_index = 0, 0, 0, 0
        self._order = self._epoch_order()
        self.buffer: list[list[Sample]] = []  # groups handed back (e.g. aborted, for partial rollout)

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.dataset) if self.dataset is not None else 0))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        """`num_prompts` groups of `n_samples_per_prompt` fresh copies, buffered groups first."""
        groups = self.buffer[:num_prompts]
        del self.buffer[:num_prompts]
        if len(groups) < num_prompts and self.dataset is None:
            raise RuntimeError("no prompt dataset (--disable-rollout-global-dataset): the rollout function must "
                               "bring its own prompts instead of calling data_source.get_samples")  # fmt: skip
        while len(groups) < num_prompts:
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order()
            prompt = self.dataset.samples[self._order[self.offset]]
            self.offset += 1
            group = []
            for _ in range(self.n_samples_per_prompt):
                s = copy.deepcopy(prompt)
                s.group_index, s.index = self.group_index, self.sample_index
                self.sample_index += 1
                group.append(s)
            self.group_index += 1
            groups.append(group)
        return groups

    def add_samples(self, groups: list[list[Sample]]) -> None:
        self.buffer.extend(groups)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("epoch", "offset", "sample_index", "group_index")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = ("epoch", "offset", "sample_index", "group_index")
        if sorted(state) != sorted(keys):
            raise ValueError(f"data source state has keys {sorted(state)}, expected {sorted(keys)}")
        for k in keys:
            setattr(self, k, int(state[k]))
        self._order = self._epoch_order()
