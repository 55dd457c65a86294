"""Hooks written against slime's documented signatures, importing only its public paths."""

from slime.utils.types import Sample


async def length_reward(args, sample: Sample, **kwargs) -> float:
    return float(sample.response_length)


async def failing_reward(args, sample: Sample, **kwargs) -> float:
    raise RuntimeError("grader exploded")


async def token_reward(args, sample: Sample, **kwargs) -> float:
    """1 for each response token below id 1000: a signal even a random tiny model can climb."""
    ids = sample.tokens[len(sample.tokens) - sample.response_length :]
    return sum(t < 1000 for t in ids) / max(len(ids), 1)


def reinforce_loss(args, batch, logits, sum_of_sample_mean):
    """A --custom-loss-function-path written against slime's signature: vanilla REINFORCE, -A * log p."""
    loss = sum_of_sample_mean(-batch["advantages"] * batch["log_probs"])
    return loss, {"custom_pg_loss": loss.detach(), "logits_rows": sum_of_sample_mean(logits.new_ones(logits.shape[0]))}


async def slow_reward(args, sample: Sample, **kwargs) -> float:
    import asyncio

    await asyncio.sleep(30)
    return 1.0
