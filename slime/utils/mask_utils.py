"""Loss masks for supervised chat data (public import path): which tokens of a rendered conversation are the
assistant's, so a supervised loss trains on those alone.

The mask is found from the tokenizer's own chat template rather than from per-model token patterns: an assistant
turn's tokens are those the template adds when the turn is appended to the conversation so far (after the
generation prompt). This holds for any template that renders a conversation as the rendering of its prefix plus the
new turn. Under a template that rewrites earlier turns (e.g. one that strips the reasoning of past assistant turns)
the tokens are the template's rendering of the whole conversation up to its last assistant turn, and the earlier
assistant turns it rewrote count as context (mask 0), not as targets.
"""

from __future__ import annotations

from typing import Any

# slime's --loss-mask-type names; the mask comes from the template whichever is given (see the module docstring)
LOSS_MASK_TYPES = ("qwen", "qwen3", "qwen3_5", "distill_qwen")


def get_response_lengths(loss_masks: list[list[int]]) -> list[int]:
    """Per mask: tokens from the first 1 to the end (0 for a mask without any)."""
    return [len(mask) - mask.index(1) if 1 in mask else 0 for mask in loss_masks]


class MultiTurnLossMaskGenerator:
    """`get_loss_mask(messages, tools=None) -> (token_ids, loss_mask)`: the conversation rendered with the
    tokenizer's chat template, and 1 on the tokens of every assistant turn (its content and end-of-turn tokens),
    0 elsewhere (system, user and tool turns, and each assistant turn's header)."""

    def __init__(self, tokenizer: Any, tokenizer_type: str = "qwen"):
        if tokenizer_type not in LOSS_MASK_TYPES:
            raise ValueError(f"--loss-mask-type {tokenizer_type!r}: expected one of {', '.join(LOSS_MASK_TYPES)}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} has no chat template")
        self.tokenizer = tokenizer
        self.tokenizer_type = tokenizer_type

    def get_response_lengths(self, loss_masks: list[list[int]]) -> list[int]:
        return get_response_lengths(loss_masks)

    def _render(self, messages: list[dict], tools: Any, generation_prompt: bool) -> list[int]:
        if not messages:
            return []
        out = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
        )
        return list(out)

    def get_loss_mask(self, messages: list[dict], tools: Any = None) -> tuple[list[int], list[int]]:
        if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant turn to train on")
        tokens: list[int] = []
        mask: list[int] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], tools, generation_prompt=True)
            turn = self._render(messages[: i + 1], tools, generation_prompt=False)
            if turn[: len(before)] != before:
                raise ValueError(
                    f"message {i}: the chat template does not render the assistant turn after its own generation "
                    "prompt, so its tokens cannot be told apart"
                )
            if before[: len(tokens)] != tokens:  # the template rewrote the history: restart from its rendering
                tokens, mask = [], []
            mask += [0] * (len(before) - len(tokens)) + [1] * (len(turn) - len(before))
            tokens = turn
        full = self._render(messages, tools, generation_prompt=False)
        if full[: len(tokens)] == tokens:  # turns after the last assistant one (none usually) are context
            mask += [0] * (len(full) - len(tokens))
            tokens = full
        return tokens, mask
