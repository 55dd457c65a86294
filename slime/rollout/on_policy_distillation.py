"""On-policy distillation from a served teacher (public import path; slime's `--opd-type sglang` recipe):

    --custom-rm-path slime.rollout.on_policy_distillation.reward_func
    --custom-reward-post-process-path slime.rollout.on_policy_distillation.post_process_rewards
    --rm-url http://TEACHER_HOST:PORT/generate --use-opd --opd-type sglang --opd-kl-coef 1.0

The teacher is any engine server speaking SGLang's /generate (`slime-serve --model-path TEACHER`, or SGLang itself):
the reward asks it to score the sample's tokens without generating (`max_new_tokens: 0`, `logprob_start_len` at the
response) and stores its log-probability of every response token in `Sample.teacher_log_probs`, which the trainer
turns into the distillation term. The reward itself is 0: the learning signal is the teacher's.
"""

from __future__ import annotations

from typing import Any

from slime.utils.http_utils import post
from slime.utils.types import Sample


async def teacher_log_probs(args: Any, sample: Sample) -> list[float]:
    """The teacher's log-probability of each of `sample`'s response tokens (temperature --rollout-temperature)."""
    if not args.rm_url:
        raise ValueError("on-policy distillation needs --rm-url: the teacher server's /generate URL")
    start = len(sample.tokens) - sample.response_length
    payload = {
        "input_ids": list(sample.tokens),
        "sampling_params": {"temperature": args.rollout_temperature, "max_new_tokens": 0, "skip_special_tokens": False},
        "return_logprob": True,
        "logprob_start_len": start,
    }
    out = await post(args.rm_url, payload, timeout=getattr(args, "rm_timeout", 600.0))
    entries = out["meta_info"]["input_token_logprobs"][-sample.response_length :] if sample.response_length else []
    values = [e[0] for e in entries]
    if len(values) != sample.response_length or any(v is None for v in values):
        raise ValueError(
            f"the teacher at {args.rm_url} returned {len(values)} prompt log-probs from position {start} for "
            f"{sample.response_length} response tokens; does it support logprob_start_len?"
        )
    return [float(v) for v in values]


async def reward_func(args: Any, sample: Sample, **kwargs: Any) -> float:
    """`--custom-rm-path`: fills `sample.teacher_log_probs` from the teacher at `--rm-url`; the reward is 0."""
    sample.teacher_log_probs = await teacher_log_probs(args, sample)
    return 0.0


def post_process_rewards(args: Any, samples: list[Sample], **kwargs: Any) -> tuple[list[float], list[float]]:
    """`--custom-reward-post-process-path`: the rewards as they are (0 from `reward_func`, or a task reward), with
    no group normalisation; the teacher log-probs were stored by the reward. A sample whose teacher call failed
    (its reward error is counted in the rollout metrics) leaves the loss; if none has them, the run stops."""
    missing = [s for s in samples if s.teacher_log_probs is None]
    if len(missing) == len(samples):
        raise ValueError(
            "no sample has teacher_log_probs: use --custom-rm-path slime.rollout.on_policy_distillation.reward_func "
            f"(or set them in your reward); first reward error: {samples[0].metadata.get('reward_error')}"
        )
    for s in missing:
        s.remove_sample = True
        s.teacher_log_probs = [0.0] * s.response_length  # out of the loss: only the shape matters
    rewards = [float(s.get_reward_value(args)) for s in samples]
    return rewards, rewards
