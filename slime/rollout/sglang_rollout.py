"""The default rollout: generate every sample of a step through the router, concurrently, then reward it.

`generate_rollout(args, rollout_id, data_source, evaluation=False)` is the public entry point (and the default of
`--rollout-function-path`); `generate` is the default per-sample generate function that
`--custom-generate-function-path` replaces.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import time
from typing import Any

from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.rollout.rm_hub import async_rm, batched_async_rm
from slime.utils.async_utils import run
from slime.utils.eval_config import EvalDatasetConfig
from slime.utils.http_utils import post
from slime.utils.misc import load_function
from slime.utils.processing_utils import load_tokenizer
from slime.utils.types import Sample

logger = logging.getLogger(__name__)
_FINISH_STATUS = {"stop": Sample.Status.COMPLETED, "length": Sample.Status.TRUNCATED, "abort": Sample.Status.ABORTED}


def router_url(args: Any) -> str:
    return f"http://{args.sglang_router_ip}:{args.sglang_router_port}"


def sampling_params(args: Any, evaluation: bool = False, dataset: EvalDatasetConfig | None = None) -> dict[str, Any]:
    """The engine's sampling_params for training, or for an eval dataset (its config has every field resolved)."""
    if dataset is not None:
        temperature, top_p, top_k, max_new = dataset.temperature, dataset.top_p, dataset.top_k, dataset.max_response_len
        stop, stop_ids = dataset.stop, dataset.stop_token_ids
    else:
        temperature, top_p, top_k = args.rollout_temperature, args.rollout_top_p, args.rollout_top_k
        max_new, stop, stop_ids = args.rollout_max_response_len, args.rollout_stop, args.rollout_stop_token_ids
        if evaluation:
            temperature = args.eval_temperature if args.eval_temperature is not None else temperature
            top_p = args.eval_top_p if getattr(args, "eval_top_p", None) is not None else top_p
            top_k = args.eval_top_k if getattr(args, "eval_top_k", None) is not None else top_k
            max_new = args.eval_max_response_len or max_new
    params = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new,
        "skip_special_tokens": args.rollout_skip_special_tokens,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }
    if dataset is not None and dataset.min_new_tokens:
        params["min_new_tokens"] = dataset.min_new_tokens
    if stop:
        params["stop"] = list(stop)
    if stop_ids:
        params["stop_token_ids"] = list(stop_ids)
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


def reward_key(args: Any, evaluation: bool = False) -> str | None:
    """The key of the scalar in dict rewards: `--eval-reward-key` (else `--reward-key`) for evaluation."""
    if evaluation and getattr(args, "eval_reward_key", None):
        return args.eval_reward_key
    return getattr(args, "reward_key", None)


def reward_source(args: Any, sample: Sample) -> str:
    """Which reward function grades `sample`, by the selection order, for error messages."""
    if sample.metadata.get("custom_rm_path"):
        return f"metadata custom_rm_path {sample.metadata['custom_rm_path']}"
    if getattr(args, "custom_rm_path", None):
        return f"--custom-rm-path {args.custom_rm_path}"
    return f"rm_type {sample.metadata.get('rm_type') or getattr(args, 'rm_type', None)}"


def check_reward(reward: Any, key: str | None, source: str) -> float | dict:
    """The one return convention: a finite real number, or a dict whose `key` entry is one."""
    if isinstance(reward, dict):
        if not key:
            raise TypeError(f"{source} returned a dict with keys {sorted(reward)}; choose the scalar with "
                            "--reward-key (and --eval-reward-key for evaluation)")  # fmt: skip
        if key not in reward:
            raise KeyError(f"{source} returned a dict without the reward key {key!r}: keys {sorted(reward)}")
        check_reward(reward[key], None, f"{source} [{key!r}]")
        return reward
    if not isinstance(reward, numbers.Real):
        raise TypeError(f"{source} returned {type(reward).__name__} {str(reward)[:80]!r}; a reward is a float or "
                        "a dict holding the --reward-key scalar")  # fmt: skip
    if not math.isfinite(reward):
        raise ValueError(f"{source} returned {reward}")
    return float(reward)


_logged_tracebacks: set[tuple[str, str]] = set()


def _mark_failed(args: Any, sample: Sample, exc: BaseException, source: str) -> None:
    """Give the sample `--reward-on-error`, record why in its metadata, and log it (the traceback once per kind)."""
    sample.reward = args.reward_on_error
    if isinstance(exc, TimeoutError) and not str(exc):  # a grader in a thread keeps running; its result is dropped
        why = f"TimeoutError: took longer than --rm-timeout {args.rm_timeout}s"
    else:
        why = f"{type(exc).__name__}: {exc}"
    sample.metadata["reward_error"] = f"{source}: {why}"
    first = (source, type(exc).__name__) not in _logged_tracebacks
    _logged_tracebacks.add((source, type(exc).__name__))
    logger.warning("reward of sample %s failed (%s); it gets --reward-on-error %s", sample.index,
                   sample.metadata["reward_error"], args.reward_on_error, exc_info=exc if first else None)  # fmt: skip


async def _reward(args: Any, sample: Sample, evaluation: bool = False) -> None:
    """Grade one sample; a reward function that raises, times out or breaks the return convention is caught."""
    source = reward_source(args, sample)
    try:
        reward = await asyncio.wait_for(async_rm(args, sample), getattr(args, "rm_timeout", None))
        sample.reward = check_reward(reward, reward_key(args, evaluation), source)
    except Exception as exc:  # one broken grading must not end the run: score it, mark it, count it
        _mark_failed(args, sample, exc, source)


async def _reward_group(args: Any, samples: list[Sample], evaluation: bool = False) -> None:
    """`--group-rm` with `--custom-rm-path`: one call grades the group; if it fails, every sample is marked."""
    source = f"--custom-rm-path {args.custom_rm_path} called with a list of samples (--group-rm)"
    try:
        rewards = await asyncio.wait_for(batched_async_rm(args, samples), getattr(args, "rm_timeout", None))
    except Exception as exc:
        for sample in samples:
            _mark_failed(args, sample, exc, source)
        return
    for sample, reward in zip(samples, rewards, strict=True):
        try:
            sample.reward = check_reward(reward, reward_key(args, evaluation), source)
        except Exception as exc:
            _mark_failed(args, sample, exc, source)


async def _generate_one(args: Any, sample: Sample, params: dict, sem: asyncio.Semaphore, gen_fn) -> Sample:
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
    return result


async def _generate_group(args: Any, group: list[Sample], params: dict, sem, gen_fn, evaluation: bool) -> list[Sample]:
    """Generate a group, then reward it: per sample, or in one call with `--group-rm --custom-rm-path`."""
    done = list(await asyncio.gather(*(_generate_one(args, s, params, sem, gen_fn) for s in group)))
    todo = [s for s in done if s.status not in (Sample.Status.ABORTED, Sample.Status.FAILED)]
    if todo and getattr(args, "group_rm", False) and args.custom_rm_path:
        await _reward_group(args, todo, evaluation)
    else:
        await asyncio.gather(*(_reward(args, s, evaluation) for s in todo))
    return done


async def _generate_groups(
    args: Any, groups: list[list[Sample]], evaluation: bool, dataset: EvalDatasetConfig | None = None
) -> list[list[Sample]]:
    gen_fn = generate
    if dataset is not None and dataset.custom_generate_function_path:
        gen_fn = load_function(dataset.custom_generate_function_path, f"eval dataset {dataset.name} generate function")
    elif args.custom_generate_function_path:
        gen_fn = load_function(args.custom_generate_function_path, "--custom-generate-function-path")
    sem = asyncio.Semaphore(args.sglang_server_concurrency * args.rollout_num_engines)
    params = sampling_params(args, evaluation, dataset)
    return list(await asyncio.gather(*(_generate_group(args, g, params, sem, gen_fn, evaluation) for g in groups)))


def scalar_reward(sample: Sample, key: str | None) -> float | None:
    """The sample's reward as a number (`key` picks it from a dict); None when it was never graded."""
    reward = sample.reward[key] if isinstance(sample.reward, dict) and key in sample.reward else sample.reward
    return float(reward) if isinstance(reward, numbers.Real) else None


def rollout_metrics(
    groups: list[list[Sample]], seconds: float, prefix: str = "rollout", key: str | None = None
) -> dict[str, float]:
    samples = [s for g in groups for s in g]
    rewards = [r for r in (scalar_reward(s, key) for s in samples) if r is not None]
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
        configs = getattr(data_source, "eval_configs", {})
        for name, groups in data_source.eval_groups().items():
            t0 = time.monotonic()
            done = run(_generate_groups(args, groups, True, configs.get(name)), timeout=args.rollout_timeout)
            samples = [s for g in done for s in g]
            key = reward_key(args, evaluation=True)
            data[name] = {
                "rewards": [scalar_reward(s, key) for s in samples],
                "truncated": [s.status == Sample.Status.TRUNCATED for s in samples],
                "samples": samples,
            }
            metrics.update(rollout_metrics(done, time.monotonic() - t0, prefix=f"eval/{name}", key=key))
        return RolloutFnEvalOutput(data=data, metrics=metrics)
    groups = data_source.get_samples(args.rollout_batch_size)
    done = run(_generate_groups(args, groups, evaluation=False), timeout=args.rollout_timeout)
    graded = [s for g in done for s in g if s.status not in (Sample.Status.ABORTED, Sample.Status.FAILED)]
    if graded and all("reward_error" in s.metadata for s in graded):
        raise RuntimeError(f"rollout {rollout_id}: all {len(graded)} rewards failed, nothing to learn from; the "
                           f"first: {graded[0].metadata['reward_error']}")  # fmt: skip
    metrics = rollout_metrics(done, time.monotonic() - start, key=reward_key(args))
    return RolloutFnTrainOutput(samples=done, metrics=metrics)
