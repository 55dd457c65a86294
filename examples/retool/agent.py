"""A ReTool-style agent: the model writes a ```python block, the code runs in slime's sandbox (time limit, memory
cap, no network, no child processes), its output comes back as a tool turn, and the final answer goes in \\boxed{}.

--custom-generate-function-path examples.retool.agent:generate
--custom-rm-path examples.retool.agent:reward
"""

from __future__ import annotations

import re
from typing import Any

from slime.rollout.multi_turn import ChatTrajectory
from slime.rollout.rm_hub.math_utils import grade_math
from slime.rollout.sandbox import run_python
from slime.utils.processing_utils import load_tokenizer
from slime.utils.types import Sample

MAX_CALLS = 2
PREFILL = True
SYSTEM = (
    "You solve math problems and may run Python to compute. Write a ```python code block that prints the result "
    "and stop; its output will be shown to you. Then give the final answer as \\boxed{answer}."
)
FENCE = "```python\n"
CODE = re.compile(r"```python\n(.*?)```", re.S)


async def generate(args: Any, sample: Sample, sampling_params: dict) -> Sample:
    """Model turns, each followed by a sandboxed run of the code it wrote, until it answers or the budget ends.
    SmolLM2-135M writes code blocks only now and then, so the first turn is opened with the fence (environment
    text, loss_mask 0; PREFILL = False for a model that needs no help)."""
    tokenizer = load_tokenizer(args.hf_checkpoint)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sample.prompt}]
    traj = ChatTrajectory(sample, tokenizer, messages=messages, max_response_len=sampling_params["max_new_tokens"])
    sample.metadata["tool_calls"], sample.metadata["tool_errors"], answer_text = 0, 0, []
    for turn_no in range(MAX_CALLS + 1):
        start = len(sample.response)
        if PREFILL and turn_no == 0:
            traj.add_text(FENCE)
        finish = await traj.generate(args, sampling_params, stop=["```\n"])
        turn = sample.response[start:]
        answer_text.append(turn)
        code = CODE.search(turn)
        if finish != "stop" or code is None or sample.metadata["tool_calls"] >= MAX_CALLS:
            break
        result = await run_python(code.group(1), timeout=5.0, memory_mb=512)
        sample.metadata["tool_calls"] += 1
        sample.metadata["tool_errors"] += not result.ok
        traj.add_messages([{"role": "tool", "content": result.to_text(limit=500)}])
    sample.metadata["model_text"] = "".join(answer_text)
    return sample


async def reward(args: Any, sample: Sample, **kwargs: Any) -> float:
    """The math grade of what the model itself wrote (tool output is not the model's answer)."""
    return grade_math(sample.metadata.get("model_text", sample.response), sample.label)
