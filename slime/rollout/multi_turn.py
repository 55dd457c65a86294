"""Multi-turn samples: model turns and tool/environment turns appended token by token, never re-tokenised.

A `ChatTrajectory` owns one `Sample` while a custom generate function talks to tools. Model turns keep the engine's
own token ids and log-probs (loss_mask 1). Environment turns are either

- chat messages (`add_messages`, e.g. role "tool"): the tokens are the chat template's rendering of the new
  messages plus the next assistant header, found as the text the template adds after what is already there, so the
  whole sample equals the template's tokenisation of the whole conversation when each segment starts after a
  special token (ChatML and most templates); or
- plain text inside the assistant's turn (`add_text`, Search-R1 style `<information>…</information>`), tokenised on
  its own.

Both get loss_mask 0 and log-prob 0. `generate` spends what is left of `max_new_tokens` over the whole response,
tool tokens included (slime's convention), so a trajectory never exceeds `--rollout-max-response-len`.
A sample handed back by `--partial-rollout` starts its conversation over (counted in `metadata["restarted"]`): the
tool state between turns is not part of a Sample.
"""

from __future__ import annotations

import logging
from typing import Any

from slime.rollout.sglang_rollout import call_engine, finish_status
from slime.utils.types import Sample

logger = logging.getLogger(__name__)


class ChatTrajectory:
    """Builds `sample` turn by turn. `messages` is the conversation the prompt was rendered from; without it the
    prompt is `sample.prompt` (a message list, or an already rendered string — later turns are then rendered after a
    stand-in user message, which is exact for templates that format each message on its own).
    `max_response_len` (usually `sampling_params["max_new_tokens"]`) caps the whole response: environment tokens
    beyond it are cut and the sample is marked truncated."""

    def __init__(
        self,
        sample: Sample,
        tokenizer: Any,
        messages: list[dict] | None = None,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        max_response_len: int | None = None,
    ):
        self.sample, self.tokenizer, self.tools = sample, tokenizer, tools
        self.max_response_len = max_response_len
        if sample.response_length:  # handed back by --partial-rollout: the conversation state is gone, start over
            logger.info(
                "sample %s: multi-turn sample resumed with %d response tokens starts over",
                sample.index,
                sample.response_length,
            )
            sample.tokens, sample.response, sample.response_length, sample.weight_versions = [], "", 0, []
            sample.loss_mask = sample.rollout_log_probs = None
            sample.metadata["restarted"] = sample.metadata.get("restarted", 0) + 1
        self.template_kwargs = dict(chat_template_kwargs or {})
        if messages is None and isinstance(sample.prompt, list):
            messages = sample.prompt
        rendered_prompt = messages is None  # sample.prompt is already the template's text
        self.messages = list(messages) if messages is not None else [{"role": "user", "content": "…"}]
        self._rendered = self._render(self.messages)  # the template's text up to the open assistant turn
        self._turn_text = ""  # what the open assistant turn holds so far: model output and in-turn text
        self._last_model_id: int | None = None  # the last token the policy produced (an end-of-turn token?)
        self.turns = 0
        if not sample.tokens:
            text = sample.prompt if rendered_prompt else self._rendered
            sample.tokens = tokenizer.encode(text, add_special_tokens=False)

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=self.tools, tokenize=False, add_generation_prompt=True, **self.template_kwargs
        )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add_model_tokens(self, token_ids: list[int], log_probs: list[float] | None = None) -> None:
        """Append tokens the policy produced (loss_mask 1), with the engine's log-probs."""
        text = self._decode(token_ids)
        self.sample.append_response(token_ids, text, loss_mask=1, log_probs=log_probs)
        self._turn_text += text
        if token_ids:
            self._last_model_id = int(token_ids[-1])

    def _append_environment(self, ids: list[int], text: str) -> list[int]:
        if self.max_response_len is not None and self.sample.response_length + len(ids) > self.max_response_len:
            ids = ids[: max(0, self.max_response_len - self.sample.response_length)]
            text = self._decode(ids)
            self.sample.status = Sample.Status.TRUNCATED
        self.sample.append_response(ids, text, loss_mask=0, log_probs=[0.0] * len(ids))
        return ids

    def add_text(self, text: str) -> list[int]:
        """Append environment text inside the open assistant turn (loss_mask 0). Returns its token ids."""
        ids = self._append_environment(self.tokenizer.encode(text, add_special_tokens=False), text)
        self._turn_text += text
        return ids

    def add_messages(self, messages: list[dict]) -> list[int]:
        """Close the assistant turn, append `messages` (tool results, user replies) and open the next assistant
        turn, all with loss_mask 0. Returns the appended token ids."""
        if not self._turn_text:
            raise ValueError("add_messages follows a model turn: generate (or add_model_tokens) first")
        content = self._turn_text
        last = self._last_model_id
        if last is not None and last in self.tokenizer.all_special_ids and content.endswith(self._decode([last])):
            content = content[: -len(self._decode([last]))]  # the turn's end-of-turn token is the template's job
        history = [*self.messages, {"role": "assistant", "content": content}]
        full = self._render([*history, *messages])
        base = self._rendered + self._turn_text
        if not full.startswith(base):
            at = next(
                (i for i, (a, b) in enumerate(zip(full, base, strict=False)) if a != b), min(len(full), len(base))
            )
            raise ValueError(
                "the chat template does not render the conversation as a continuation of the tokens so far (it "
                f"rewrites the assistant turn near {full[max(0, at - 40) : at + 40]!r}); use add_text for this "
                "template"
            )
        text = full[len(base) :]
        ids = self._append_environment(self.tokenizer.encode(text, add_special_tokens=False), text)
        self.messages, self._rendered, self._turn_text = [*history, *messages], full, ""
        return ids

    def remaining(self, sampling_params: dict[str, Any]) -> int:
        """Tokens left for the whole response: `max_new_tokens` (and `max_response_len`) minus what is there."""
        budget = int(sampling_params["max_new_tokens"])
        if self.max_response_len is not None:
            budget = min(budget, self.max_response_len)
        return budget - self.sample.response_length

    async def generate(self, args: Any, sampling_params: dict[str, Any], **overrides: Any) -> str:
        """One model turn through the router with what is left of the budget (`overrides` change sampling params
        for this turn, e.g. `stop=["</search>"]`). Sets the sample's status; returns the finish reason type:
        "stop", "length" or "abort"."""
        params = {**sampling_params, **overrides, "max_new_tokens": self.remaining(sampling_params)}
        if params["max_new_tokens"] <= 0:
            self.sample.status = Sample.Status.TRUNCATED
            return "length"
        ids, lps, _, versions, finish = await call_engine(args, self.sample.tokens, params)
        self.add_model_tokens(ids, lps)
        if ids:
            self.sample.weight_versions += versions
        self.turns += 1
        self.sample.status = finish_status(finish)
        return finish
