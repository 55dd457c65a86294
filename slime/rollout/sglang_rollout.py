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
from slime.rollout.scoring import reward_key, scalar_reward, score_group, score_sample
from slime.utils.async_utils import run
from slime.utils.eval_config import EvalDatasetConfig, resolve
from slime.utils.http_utils import post
from slime.utils.misc import load_function
from slime.utils.processing_utils import load_tokenizer
from slime.utils.types import Sample

logger = logging.getLogger(__name__)
_FINISH_STATUS = {"stop": Sample.Status.COMPLETED, "length": Sample.Status.TRUNCATED, "abort": Sample.Status.ABORTED}


def router_url(args: Any) -> str:
    return f"http://{args.sglang_router_ip}:{args.sglang_router_port}"


def sampling_params(args: Any, evaluation: bool = False, dataset: EvalDatasetConfig | None = None) -> dict[str, Any]:
    """The engine's sampling_params for training, or for evaluation: an eval dataset's resolved config, or for a
    dataset without one, the `--eval-*` flags over the rollout's (slime.utils.eval_config.resolve)."""
    if evaluation and dataset is None:
        dataset = resolve(args, {"name": "eval", "path": ""})
    if dataset is not None:
        temperature, top_p, top_k, max_new = dataset.temperature, dataset.top_p, dataset.top_k, dataset.max_response_len
        stop, stop_ids = dataset.stop, dataset.stop_token_ids
    else:
        temperature, top_p, top_k = args.rollout_temperature, args.rollout_top_p, args.rollout_top_k
        max_new, stop, stop_ids = args.rollout_max_response_len, args.rollout_stop, args.rollout_stop_token_ids
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
        await score_group(args, todo, evaluation)
    else:
        await asyncio.gather(*(score_sample(args, s, evaluation) for s in todo))
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
