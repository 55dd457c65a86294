"""The default rollout: generate every sample of a step through the router, concurrently, then reward it.

`generate_rollout(args, rollout_id, data_source, evaluation=False)` is the public entry point (and the default of
`--rollout-function-path`); `generate` is the default per-sample generate function that
`--custom-generate-function-path` replaces.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.rollout.rm_hub import async_rm
from slime.utils.async_utils import run
from slime.utils.http_utils import post
from slime.utils.misc import load_function
from slime.utils.processing_utils import load_tokenizer
from slime.utils.types import Sample

logger = logging.getLogger(__name__)
_FINISH_STATUS = {"stop": Sample.Status.COMPLETED, "length": Sample.Status.TRUNCATED, "abort": Sample.Status.ABORTED}


def router_url(args: Any) -> str:
    return f"http://{args.sglang_router_ip}:{args.sglang_router_port}"


def sampling_params(args: Any, evaluation: bool = False) -> dict[str, Any]:
    temperature = args.rollout_temperature
    max_new = args.rollout_max_response_len
    if evaluation:
        temperature = args.eval_temperature if args.eval_temperature is not None else temperature
        max_new = args.eval_max_response_len or max_new
    params = {
        "temperature": temperature,
        "top_p": args.rollout_top_p,
        "top_k": args.rollout_top_k,
        "max_new_tokens": max_new,
        "skip_special_tokens": args.rollout_skip_special_tokens,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }
    if args.rollout_stop:
        params["stop"] = args.rollout_stop
    if args.rollout_stop_token_ids:
        params["stop_token_ids"] = args.rollout_stop_token_ids
    return params


async def generate(args: Any, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """One response for `sample` (resuming its partial response, if any) via POST /generate on the router."""
    tokenizer = load_tokenizer(args.hf_checkpoint)
    if not sample.tokens:
        sample.tokens = tokenizer.encode(sample.prompt, add_special_tokens=False)
    params = dict(sampling_params)
    params["max_new_tokens"] = params["max_new_tokens"] - sample.response_length
    if params["max_new_tokens"] <= 0:
        sample.status = Sample.Status.TRUNCATED
        return sample
    out = await post(
        f"{router_url(args)}/generate",
        {"input_ids": sample.tokens, "sampling_params": params, "return_logprob": True},
    )
    meta = out["meta_info"]
    new_ids = [int(t[1]) for t in meta["output_token_logprobs"]]
    new_lps = [float(t[0]) for t in meta["output_token_logprobs"]]
    sample.append_response(new_ids, out["text"], loss_mask=1, log_probs=new_lps)
    sample.weight_versions.append(str(meta.get("weight_version")))
    sample.status = _FINISH_STATUS.get(meta["finish_reason"]["type"], Sample.Status.FAILED)
    return sample


async def _reward(args: Any, sample: Sample) -> None:
    timeout = getattr(args, "rm_timeout", None)
    try:
        sample.reward = await asyncio.wait_for(async_rm(args, sample), timeout)
    except Exception as exc:  # one broken grading must not end the run: score it, mark it, count it
        sample.reward = args.reward_on_error
        if isinstance(exc, TimeoutError):  # a grader in a thread keeps running; its result is dropped
            sample.metadata["reward_error"] = f"TimeoutError: the reward took longer than --rm-timeout {timeout}s"
        else:
            sample.metadata["reward_error"] = f"{type(exc).__name__}: {exc}"
        logger.warning("reward failed for sample %s: %s", sample.index, sample.metadata["reward_error"])


async def _generate_and_reward(args: Any, sample: Sample, params: dict, sem: asyncio.Semaphore, gen_fn) -> Sample:
    async with sem:
        try:
            result = await gen_fn(args, sample, params)
        except Exception as exc:
            sample.status = Sample.Status.FAILED
            sample.metadata["generate_error"] = f"{type(exc).__name__}: {exc}"
            logger.warning("generation failed for sample %s: %s", sample.index, sample.metadata["generate_error"])
            sample.reward = args.reward_on_error
            return sample
    if isinstance(result, list):
        raise TypeError("a generate function returning a list of samples is not supported by generate_rollout yet")
    if result.status != Sample.Status.ABORTED:
        await _reward(args, result)
    return result


async def _generate_groups(args: Any, groups: list[list[Sample]], evaluation: bool) -> list[list[Sample]]:
    gen_fn = generate
    if args.custom_generate_function_path:
        gen_fn = load_function(args.custom_generate_function_path, "--custom-generate-function-path")
    sem = asyncio.Semaphore(args.sglang_server_concurrency * args.rollout_num_engines)
    params = sampling_params(args, evaluation)
    tasks = [[_generate_and_reward(args, s, params, sem, gen_fn) for s in group] for group in groups]
    flat = await asyncio.gather(*(t for group in tasks for t in group))
    out, i = [], 0
    for group in groups:
        out.append(list(flat[i : i + len(group)]))
        i += len(group)
    return out


def rollout_metrics(groups: list[list[Sample]], seconds: float, prefix: str = "rollout") -> dict[str, float]:
    samples = [s for g in groups for s in g]
    rewards = [float(s.reward) for s in samples if isinstance(s.reward, int | float)]
    tokens = sum(s.response_length for s in samples)
    n = max(len(samples), 1)
    return {
        f"{prefix}/reward_mean": sum(rewards) / max(len(rewards), 1),
        f"{prefix}/response_len_mean": tokens / n,
        f"{prefix}/truncated_ratio": sum(s.status == Sample.Status.TRUNCATED for s in samples) / n,
        f"{prefix}/failed": sum(s.status == Sample.Status.FAILED for s in samples),
        f"{prefix}/reward_errors": sum("reward_error" in s.metadata for s in samples),
        f"{prefix}/tokens": tokens,
        f"{prefix}/seconds": seconds,
        f"{prefix}/tokens_per_s": tokens / max(seconds, 1e-9),
        f"{prefix}/weight_version": max((int(v) for s in samples for v in s.weight_versions if v.isdigit()), default=0),
    }


def generate_rollout(
    args: Any, rollout_id: int, data_source: Any, evaluation: bool = False
) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """Training: `--rollout-batch-size` groups from `data_source`. Evaluation: every eval dataset in full."""
    start = time.monotonic()
    if evaluation:
        data, metrics = {}, {}
        for name, groups in data_source.eval_groups().items():
            t0 = time.monotonic()
            done = run(_generate_groups(args, groups, evaluation=True), timeout=args.rollout_timeout)
            samples = [s for g in done for s in g]
            data[name] = {"rewards": [s.reward for s in samples], "samples": samples}
            metrics.update(rollout_metrics(done, time.monotonic() - t0, prefix=f"eval/{name}"))
        return RolloutFnEvalOutput(data=data, metrics=metrics)
    groups = data_source.get_samples(args.rollout_batch_size)
    done = run(_generate_groups(args, groups, evaluation=False), timeout=args.rollout_timeout)
    return RolloutFnTrainOutput(samples=done, metrics=rollout_metrics(done, time.monotonic() - start))
