"""Supervised fine-tuning through the RL loop (public import path, slime's SFT recipe):

    --rollout-function-path slime.rollout.sft_rollout.generate_rollout --loss-type sft_loss
    --disable-compute-advantages-and-returns --debug-train-only --input-key messages

Each prompt of `--prompt-data` is a whole conversation (chat messages, kept as messages without
`--apply-chat-template`); the rollout renders it with the chat template and trains on the assistant turns
(slime.utils.mask_utils). No engine generates anything, so `--debug-train-only` runs without engines.
"""

from __future__ import annotations

import logging
from typing import Any

from slime.utils.mask_utils import MultiTurnLossMaskGenerator
from slime.utils.processing_utils import load_tokenizer
from slime.utils.types import Sample

__all__ = ["generate_rollout"]

logger = logging.getLogger(__name__)


def sft_sample(args: Any, sample: Sample) -> Sample:
    """`sample` with its conversation rendered: tokens, the response from the first assistant token on, its mask."""
    messages = sample.prompt
    if isinstance(messages, str):
        raise ValueError(
            f"sample {sample.index} (line {sample.metadata.get('source_line')}): the SFT rollout needs a conversation "
            "(a list of chat messages under --input-key) kept as messages: drop --apply-chat-template"
        )
    generator = MultiTurnLossMaskGenerator(load_tokenizer(args.hf_checkpoint), args.loss_mask_type)
    try:
        tokens, mask = generator.get_loss_mask(messages, tools=sample.metadata.get("tools"))
    except ValueError as exc:
        raise ValueError(f"sample {sample.index} (line {sample.metadata.get('source_line')}): {exc}") from exc
    (response_length,) = generator.get_response_lengths([mask])
    sample.tokens = tokens
    sample.response_length = response_length
    sample.loss_mask = mask[len(mask) - response_length :]
    sample.reward = 0.0
    sample.status = Sample.Status.COMPLETED
    return sample


def generate_rollout(args: Any, rollout_id: int, data_source: Any, evaluation: bool = False) -> list[list[Sample]]:
    """`--rollout-batch-size` conversations from `data_source`, as training samples (one per group)."""
    if evaluation:
        raise ValueError("the SFT rollout has no evaluation; drop --eval-prompt-data or set --eval-function-path")
    groups = data_source.get_samples(args.rollout_batch_size)
    for group in groups:
        for sample in group:
            sft_sample(args, sample)
    if rollout_id == 0 and groups:
        first = groups[0][0]
        logger.info(
            "SFT sample: %d tokens, %d trained (of a %d-token response)",
            len(first.tokens),
            sum(first.loss_mask),
            first.response_length,
        )
    return groups
