"""`Sample`: one prompt's one response as it travels rollout → reward → training (public import path)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class SampleAlignmentError(ValueError):
    """tokens, loss_mask and rollout_log_probs disagree about the response length."""


@dataclass
class Sample:
    """A prompt, one generated response and everything training needs to know about it.

    `tokens` holds prompt + response token ids; the last `response_length` of them are the response. `loss_mask` and
    `rollout_log_probs` (when set) have exactly `response_length` entries, one per response token: `loss_mask` is 1 for
    tokens the policy produced and 0 for tokens that came from elsewhere (tool output, environment), and
    `rollout_log_probs` are the engine's log-probabilities of those tokens (0.0 where the engine did not produce them).
    """

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    group_index: int | None = None
    index: int | None = None
    # the trajectory this sample belongs to: a generate function that returns several samples for one trajectory
    # (agents, sub-agents) gets the same id on each; the loss then weighs the trajectory once. None: its own.
    rollout_id: int | None = None
    prompt: str | list[dict[str, Any]] = ""
    tokens: list[int] = field(default_factory=list)
    multimodal_inputs: dict[str, Any] | None = None
    response: str = ""
    response_length: int = 0
    label: str | None = None
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    teacher_log_probs: list[float] | None = None
    remove_sample: bool = False
    status: Status = Status.PENDING
    metadata: dict[str, Any] = field(default_factory=dict)
    train_metadata: dict[str, Any] | None = None
    non_generation_time: float = 0.0

    @property
    def truncated(self) -> bool:
        return self.status == Sample.Status.TRUNCATED

    @property
    def aborted(self) -> bool:
        return self.status == Sample.Status.ABORTED

    @property
    def effective_response_length(self) -> int:
        """Response tokens that count in the loss."""
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    def get_reward_value(self, args: Any) -> float:
        """The scalar reward: `reward[args.reward_key]` when the reward is a dict."""
        key = getattr(args, "reward_key", None)
        if isinstance(self.reward, dict):
            if not key:
                raise ValueError(f"sample {self.index}: reward is a dict {sorted(self.reward)}; set --reward-key")
            if key not in self.reward:
                raise KeyError(f"sample {self.index}: --reward-key {key!r} not in reward keys {sorted(self.reward)}")
            return float(self.reward[key])
        if self.reward is None:
            raise ValueError(f"sample {self.index}: no reward was computed")
        return float(self.reward)

    def append_response(
        self, token_ids: list[int], text: str = "", loss_mask: int = 1, log_probs: list[float] | None = None
    ) -> None:
        """Extend the response with tokens, keeping tokens / loss_mask / rollout_log_probs aligned. The lists are
        extended in place, as in slime: a generate function holding `sample.loss_mask` (slime's retool example does)
        sees the new entries."""
        self.check_alignment()
        if log_probs is not None and len(log_probs) != len(token_ids):
            raise SampleAlignmentError(f"{len(log_probs)} log_probs for {len(token_ids)} tokens")
        if self.loss_mask is None:
            self.loss_mask = [1] * self.response_length
        if self.rollout_log_probs is None and (log_probs is not None or self.response_length == 0):
            self.rollout_log_probs = [0.0] * self.response_length
        self.tokens += list(token_ids)
        self.response += text
        self.response_length += len(token_ids)
        self.loss_mask += [loss_mask] * len(token_ids)
        if self.rollout_log_probs is not None:
            self.rollout_log_probs += list(log_probs) if log_probs else [0.0] * len(token_ids)
        self.check_alignment()

    def append_response_tokens(
        self,
        args: Any = None,
        *,
        tokens: list[int] | None = None,
        log_probs: list[float] | None = None,
        trainable: bool = True,
        meta_info: dict[str, Any] | None = None,
        text: str | None = None,
        update_terminal_info: bool = True,
    ) -> None:
        """slime's way for multi-turn generate functions to extend the response. Model tokens pass `trainable=True`
        with their engine log-probs; tool or environment tokens pass `trainable=False` and no log-probs (they get
        loss mask 0 and log-prob 0). `meta_info` is the engine's /generate answer: its `weight_version` is
        recorded and, with `update_terminal_info`, its finish reason sets the status."""
        tokens = [int(t) for t in tokens or []]
        if log_probs is not None:
            log_probs = [float(x) for x in log_probs]
        if tokens and trainable and log_probs is None:
            raise SampleAlignmentError("trainable response tokens need their rollout log-probs")
        if not trainable and log_probs is not None:
            raise SampleAlignmentError("tokens with trainable=False take no log-probs (they are not the model's)")
        if trainable and log_probs is not None and self.rollout_log_probs is None and self.response_length:
            raise SampleAlignmentError(
                f"{self.response_length} response tokens have no rollout log-probs; trainable tokens cannot follow"
            )
        self.append_response(tokens, text or "", loss_mask=int(trainable), log_probs=log_probs)
        if meta_info:
            if tokens:
                self.weight_versions += weight_versions_of(meta_info)
            finish = (meta_info.get("finish_reason") or {}).get("type")
            if update_terminal_info and finish in FINISH_STATUS:
                self.status = FINISH_STATUS[finish]

    def check_alignment(self) -> None:
        """Raise SampleAlignmentError unless the per-response-token lists all have `response_length` entries."""
        where = f"sample (group {self.group_index}, index {self.index})"
        if not 0 <= self.response_length <= len(self.tokens):
            raise SampleAlignmentError(
                f"{where}: response_length={self.response_length} but tokens has {len(self.tokens)} ids"
            )
        for name in ("loss_mask", "rollout_log_probs", "teacher_log_probs"):
            value = getattr(self, name)
            if value is not None and len(value) != self.response_length:
                raise SampleAlignmentError(
                    f"{where}: {name} has {len(value)} entries but response_length is {self.response_length}"
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        data = dict(data)
        data["status"] = Sample.Status(data.get("status", "pending"))
        return cls(**data)


def trajectory_numbers(rollout_ids: list[Any]) -> list[int]:
    """Number the trajectories of samples in order from their `rollout_id`s: equal ids share a number, a None id is
    a trajectory of its own. [B] -> [B], numbers 0, 1, ... by first appearance."""
    numbers: dict[Any, int] = {}
    keys = [("id", r) if r is not None else ("own", k) for k, r in enumerate(rollout_ids)]
    return [numbers.setdefault(key, len(numbers)) for key in keys]


def weight_versions_of(meta_info: dict[str, Any]) -> list[str]:
    """The weight versions one /generate answer was produced with: every span's version when the weights changed
    while it ran (our engine's `weight_versions`: [{version, start, end}]), else its `weight_version`."""
    spans = meta_info.get("weight_versions")
    if spans:
        return [str(span["version"]) for span in spans]
    version = meta_info.get("weight_version")
    return [] if version is None else [str(version)]


FINISH_STATUS = {"stop": Sample.Status.COMPLETED, "length": Sample.Status.TRUNCATED, "abort": Sample.Status.ABORTED}


@dataclass
class TrainBatch:
    """One rollout as the trainer receives it: B samples in rollout order (the n samples of a prompt consecutive).

    A sample whose generation failed, or that a hook marked `remove_sample`, keeps its place (its group's statistics
    need it) with an all-zero loss mask. Per-response-token lists have r_i entries (r_i = response_lengths[i]);
    `rollout_log_probs` / `teacher_log_probs` entries are [] where the engine or hook gave none.
    """

    tokens: list[list[int]]  # B x [prompt + response ids]
    response_lengths: list[int]  # [B]
    loss_masks: list[list[int]]  # B x [r_i], 1 where the token counts in the loss
    rewards: list[float]  # [B] scalar rewards (after --custom-reward-post-process-path, if set)
    rollout_log_probs: list[list[float]] = field(default_factory=list)  # B x [r_i] or []: the engine's log-probs
    teacher_log_probs: list[list[float]] = field(default_factory=list)  # B x [r_i] or []: --opd-type sglang
    # prompt groups: samples per group, in order ([] = consecutive groups of --n-samples-per-prompt)
    group_sizes: list[int] = field(default_factory=list)
    # [B] trajectory number of each sample: samples of one trajectory count once in the loss ([] = one each)
    trajectories: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class TokenColumns:
    """The per-token inputs and outputs of the advantage estimators and losses over one rollout, inside the
    trainer: each field is a list of B tensors [r_i] (None where the run does not compute it)."""

    loss_masks: list[Any]  # 1.0 where the token counts in the loss
    old_log_probs: list[Any]  # the behaviour policy's log-prob of each token (recomputed, or the engine's)
    group_sizes: list[int] | None = None  # samples per prompt group, in order (None: groups of --n-samples-per-prompt)
    kl: list[Any] | None = None  # KL(old || reference) estimate per token; zeros without a KL reward penalty
    ref_log_probs: list[Any] | None = None  # the frozen reference's log-probs (KL terms)
    teacher_log_probs: list[Any] | None = None  # the distillation teacher's log-probs
    values: list[Any] | None = None  # the critic's V(s_t) before each token (ppo)
    rollout_log_probs: list[Any] | None = None  # the engine's log-probs (mismatch corrections and metrics)
    advantages: list[Any] | None = None  # set by slime.algorithms.advantages.compute_advantages
    returns: list[Any] | None = None  # value targets (ppo)
    is_weights: list[Any] | None = None  # TIS importance weights
    is_masks: list[Any] | None = None  # MIS keep masks
