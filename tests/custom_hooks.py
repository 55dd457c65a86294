"""Hooks written against slime's documented signatures, importing only its public paths."""

from slime.utils.types import Sample


async def length_reward(args, sample: Sample, **kwargs) -> float:
    return float(sample.response_length)


async def failing_reward(args, sample: Sample, **kwargs) -> float:
    raise RuntimeError("grader exploded")
