"""Reward functions (public import path): `async_rm` for one sample, `batched_async_rm` for a group.

Selection order, first match wins: the sample's own `metadata["custom_rm_path"]`, `--custom-rm-path`,
`metadata["rm_type"]`, `--rm-type`. docs/rewards.md says what each built-in type extracts and compares.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from slime.rollout.rm_hub.ifeval import ifeval_score
from slime.rollout.rm_hub.math_utils import grade_math, last_boxed
from slime.rollout.rm_hub.text_graders import dapo_score, f1_score, gpqa_score
from slime.utils.http_utils import post
from slime.utils.misc import load_function
from slime.utils.types import Sample


def _label(sample: Sample, rm_type: str) -> str:
    if sample.label is None:
        raise ValueError(f"--rm-type {rm_type} needs a label; sample {sample.index} has none (set --label-key)")
    return str(sample.label)


def _math(args: Any, sample: Sample) -> float:
    return grade_math(sample.response, _label(sample, "math"))


def _deepscaler(args: Any, sample: Sample) -> float:
    """The math check on what follows the closed thinking part (`</think>` or `###Response`); 0 if it is open."""
    for marker in ("</think>", "###Response"):
        if marker in sample.response:
            return grade_math(sample.response.rsplit(marker, 1)[1], _label(sample, "deepscaler"))
    return 0.0


def _random(args: Any, sample: Sample) -> float:
    return float(random.randint(0, 1))


def _dapo(args: Any, sample: Sample) -> dict:
    return dapo_score(sample.response, _label(sample, "dapo"))


def _f1(args: Any, sample: Sample) -> float:
    return f1_score(sample.response, _label(sample, "f1"))


def _gpqa(args: Any, sample: Sample) -> float:
    return gpqa_score(sample.response, _label(sample, "gpqa"))


def _ifeval(args: Any, sample: Sample) -> float:
    return ifeval_score(sample.response, sample.label, sample.metadata)


BUILTIN_RM = {
    "math": _math,
    "deepscaler": _deepscaler,
    "dapo": _dapo,
    "f1": _f1,
    "gpqa": _gpqa,
    "ifeval": _ifeval,
    "random": _random,
}


async def remote_rm(args: Any, sample: Sample) -> float | dict:
    """POST {"prompt", "response", "label"} as JSON to `--rm-url`; the answer is a JSON number or dict (or a number
    as text). Connection errors and 5xx answers are retried `--rm-max-retries` times; each try waits at most
    `--rm-timeout` seconds."""
    url = getattr(args, "rm_url", None)
    if not url:
        raise ValueError("rm_type remote_rm needs --rm-url")
    payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
    retries, timeout = getattr(args, "rm_max_retries", 3), getattr(args, "rm_timeout", None) or 60.0
    answer = await post(url, payload, max_retries=retries, timeout=timeout)
    if isinstance(answer, str):
        try:
            return float(answer)
        except ValueError:
            raise ValueError(f"remote reward {url} answered {answer[:200]!r}, not a number or JSON") from None
    return answer


BOXED_READY = ("gpqa", "math")  # graders that read a `\\boxed{}`; the others look for text a box never holds


def builtin_rm(rm_type: str):
    """The built-in grader for `rm_type`; `boxed_<type>` grades only the last `\\boxed{}` of the response (0 when
    there is none) with `<type>`, for the types in BOXED_READY."""
    if rm_type.startswith("boxed_") and rm_type[6:] in BOXED_READY:
        inner = BUILTIN_RM[rm_type[6:]]

        def boxed(args: Any, sample: Sample) -> float:
            answer = last_boxed(sample.response)
            if answer is None:
                return 0.0
            return inner(args, Sample(response=f"\\boxed{{{answer}}}", label=sample.label, index=sample.index))

        return boxed
    fn = BUILTIN_RM.get(rm_type)
    if fn is None:
        raise ValueError(
            f"unknown rm_type {rm_type!r}; built-in: {sorted(BUILTIN_RM)}, remote_rm (with --rm-url), and "
            f"boxed_<type> for {BOXED_READY}"
        )
    return fn


async def async_rm(args: Any, sample: Sample, **kwargs: Any) -> float | dict:
    """The reward of one sample, by the selection order in this module's docstring."""
    custom = sample.metadata.get("custom_rm_path") or getattr(args, "custom_rm_path", None)
    if custom:
        flag = "metadata.custom_rm_path" if sample.metadata.get("custom_rm_path") else "--custom-rm-path"
        return await load_function(custom, flag)(args, sample, **kwargs)
    rm_type = sample.metadata.get("rm_type") or getattr(args, "rm_type", None)
    if not rm_type:
        raise ValueError("no reward function: set --rm-type or --custom-rm-path")
    if rm_type == "remote_rm":
        return await remote_rm(args, sample)
    return await asyncio.to_thread(builtin_rm(rm_type), args, sample)


async def batched_async_rm(args: Any, samples: list[Sample], **kwargs: Any) -> list[float | dict]:
    """The rewards of a group, in order. `--custom-rm-path` is called once with the whole list (slime's group
    convention, used by `--group-rm`) and must return one reward per sample; otherwise each sample is graded on
    its own, concurrently."""
    custom = getattr(args, "custom_rm_path", None)
    if custom:
        fn = load_function(custom, "--custom-rm-path")
        rewards = await fn(args, samples, **kwargs)
        if not isinstance(rewards, list | tuple) or len(rewards) != len(samples):
            got = f"a list of {len(rewards)}" if isinstance(rewards, list | tuple) else type(rewards).__name__
            raise TypeError(
                f"--custom-rm-path {custom} got {len(samples)} samples and returned {got}; with "
                "--group-rm it must return one reward per sample"
            )
        return list(rewards)
    return list(await asyncio.gather(*(async_rm(args, s, **kwargs) for s in samples)))
