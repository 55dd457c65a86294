"""Reward functions (public import path): `async_rm` for one sample, `batched_async_rm` for many.

Selection order, first match wins: the sample's own `metadata["custom_rm_path"]`, `--custom-rm-path`,
`metadata["rm_type"]`, `--rm-type`.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from slime.rollout.rm_hub.math_utils import grade_math
from slime.utils.misc import load_function
from slime.utils.types import Sample


def _label(sample: Sample, rm_type: str) -> str:
    if sample.label is None:
        raise ValueError(f"--rm-type {rm_type} needs a label; sample {sample.index} has none (set --label-key)")
    return str(sample.label)


def _math(args: Any, sample: Sample) -> float:
    return grade_math(sample.response, _label(sample, "math"))


def _random(args: Any, sample: Sample) -> float:
    return float(random.randint(0, 1))


BUILTIN_RM = {"math": _math, "random": _random}


async def async_rm(args: Any, sample: Sample, **kwargs: Any) -> float | dict:
    """The reward of one sample, by the selection order in this module's docstring."""
    custom = sample.metadata.get("custom_rm_path") or getattr(args, "custom_rm_path", None)
    if custom:
        flag = "metadata.custom_rm_path" if sample.metadata.get("custom_rm_path") else "--custom-rm-path"
        return await load_function(custom, flag)(args, sample, **kwargs)
    rm_type = sample.metadata.get("rm_type") or getattr(args, "rm_type", None)
    if not rm_type:
        raise ValueError("no reward function: set --rm-type or --custom-rm-path")
    fn = BUILTIN_RM.get(rm_type)
    if fn is None:
        raise ValueError(f"unknown rm_type {rm_type!r}; built-in: {sorted(BUILTIN_RM)}")
    return await asyncio.to_thread(fn, args, sample)


async def batched_async_rm(args: Any, samples: list[Sample], **kwargs: Any) -> list[float | dict]:
    return list(await asyncio.gather(*(async_rm(args, s, **kwargs) for s in samples)))
