"""A Search-R1-style agent: the model searches a local BM25 index with <search>query</search>, reads the results
as a tool turn, and answers with <answer>…</answer>.

--custom-generate-function-path examples.search_r1.agent:generate
--custom-rm-path examples.search_r1.agent:reward
"""

from __future__ import annotations

import functools
import re
from typing import Any

from examples.search_r1.corpus import BM25, build_corpus
from slime.rollout.multi_turn import ChatTrajectory
from slime.rollout.rm_hub.text_graders import f1_score
from slime.utils.processing_utils import load_tokenizer
from slime.utils.types import Sample

MAX_SEARCHES = 1
PREFILL = True
SYSTEM = (
    "You answer questions about countries using a search engine. To search, write <search>your query</search> "
    "and stop; the results will be shown to you. When you know the answer, write <answer>the answer</answer>."
)
SEARCH = re.compile(r"<search>(.*?)</search>", re.S)
ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|<\|im_end\|>|\Z)", re.S)


@functools.cache
def index() -> BM25:
    return BM25(build_corpus()[0])


def messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def generate(args: Any, sample: Sample, sampling_params: dict) -> Sample:
    """Up to MAX_SEARCHES search rounds, then a final answer turn; every search result is a loss-masked tool turn.

    SmolLM2-135M does not use the tags on its own, so the first turn is opened with "<search>" and the last
    allowed one with "<answer>" (environment text, loss_mask 0): the policy learns what to search for and what
    to answer. A stronger model needs neither (set PREFILL = False)."""
    tokenizer = load_tokenizer(args.hf_checkpoint)
    traj = ChatTrajectory(
        sample, tokenizer, messages=messages(sample.prompt), max_response_len=sampling_params["max_new_tokens"]
    )
    sample.metadata["searches"] = []
    for turn_no in range(MAX_SEARCHES + 1):
        start = len(sample.response)
        if PREFILL and turn_no in (0, MAX_SEARCHES):
            traj.add_text("<search>" if turn_no == 0 else "<answer>")
        finish = await traj.generate(args, sampling_params, stop=["</search>", "</answer>"])
        turn = sample.response[start:]
        query = SEARCH.search(turn)
        if finish != "stop" or query is None or ANSWER.search(turn) or len(sample.metadata["searches"]) >= MAX_SEARCHES:
            break
        hits = index().search(query.group(1), k=3)
        sample.metadata["searches"].append(query.group(1).strip())
        text = "\n".join(f"[{i + 1}] {doc}" for i, (_, doc) in enumerate(hits)) or "No results."
        traj.add_messages([{"role": "tool", "content": text}])
    return sample


async def reward(args: Any, sample: Sample, **kwargs: Any) -> float:
    """Token F1 of the model's last <answer> against the label (0 without an answer)."""
    answers = ANSWER.findall(sample.response)
    return f1_score(answers[-1], sample.label) if answers else 0.0
