"""The default rollout: generate samples through the router, concurrently, grade them, keep what the step needs.

`generate_rollout(args, rollout_id, data_source, evaluation=False)` is the public entry point (and the default of
`--rollout-function-path`). `generate` is the default per-sample generate function that
`--custom-generate-function-path` replaces; `generate_and_rm` / `generate_and_rm_group` (generate, then grade) are
public for custom rollout functions. Dynamic sampling (`--over-sampling-batch-size`,
`--dynamic-sampling-filter-path`) and partial rollout (`--partial-rollout`) live in `_train_rollout`.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.rollout.data_source import eval_groups
from slime.rollout.filter_hub.base_types import DynamicFilterOutput
from slime.rollout.scoring import reward_key, scalar_reward, score_group, score_sample
from slime.utils.async_utils import run
from slime.utils.eval_config import EvalDatasetConfig, resolve
from slime.utils.http_utils import HTTPError, get, post
from slime.utils.misc import load_function
from slime.utils.processing_utils import load_tokenizer
from slime.utils.types import FINISH_STATUS, Sample, trajectory_numbers, weight_versions_of

logger = logging.getLogger(__name__)


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


async def call_engine(
    args: Any, input_ids: list[int], params: dict[str, Any]
) -> tuple[list, list, str, list[str], str]:
    """One POST /generate on the router. Returns (new token ids, their log-probs, text, the weight versions they
    were generated with (two when the weights changed mid-way), finish reason type: stop / length / abort)."""
    out = await post(
        f"{router_url(args)}/generate", {"input_ids": input_ids, "sampling_params": params, "return_logprob": True}
    )
    meta = out["meta_info"]
    ids = [int(t[1]) for t in meta["output_token_logprobs"]]
    lps = [float(t[0]) for t in meta["output_token_logprobs"]]
    return ids, lps, out["text"], weight_versions_of(meta), meta["finish_reason"]["type"]


def finish_status(finish: str) -> Sample.Status:
    return FINISH_STATUS.get(finish, Sample.Status.FAILED)


async def generate(args: Any, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """One response for `sample` (resuming its partial response, if any) via POST /generate on the router."""
    tokenizer = load_tokenizer(args.hf_checkpoint)
    if not sample.tokens:
        if not isinstance(sample.prompt, str):
            raise ValueError(
                "the prompt is a list of chat messages, which the default generate function does not render: add "
                "--apply-chat-template, or use a --custom-generate-function-path that handles messages"
            )
        sample.tokens = tokenizer.encode(sample.prompt, add_special_tokens=False)
    params = dict(sampling_params)
    params["max_new_tokens"] = params["max_new_tokens"] - sample.response_length
    if params["max_new_tokens"] <= 0:
        sample.status = Sample.Status.TRUNCATED
        return sample
    ids, lps, text, versions, finish = await call_engine(args, sample.tokens, params)
    sample.append_response(ids, text, loss_mask=1, log_probs=lps)
    if ids:
        sample.weight_versions += versions
    sample.status = finish_status(finish)
    return sample


@dataclass
class _GenState:
    """One rollout's generation: the concurrency limit and whether the rollout stopped wanting results."""

    semaphore: asyncio.Semaphore
    aborted: bool = False


_STATE: contextvars.ContextVar[_GenState] = contextvars.ContextVar("slime_generate_state")
# Set (by the rollout manager) when the run is stopping (Ctrl-C): the rollout under way ends at once instead of
# generating to the end. Never cleared: a stopped run does not roll out again in this process.
ROLLOUT_STOP = threading.Event()


class RolloutStopped(RuntimeError):
    """The rollout was cut short because the run is stopping; nothing of it is trained."""


class GenerateState:
    """slime's generation state at its import path, for generate functions written against slime: they read
    `GenerateState(args).tokenizer` and `.sampling_params`. One per process and checkpoint; `semaphore` and `aborted`
    are those of the rollout the caller runs in (the concurrency limit, and whether the rollout stopped wanting
    results)."""

    _instances: dict[str, GenerateState] = {}

    def __new__(cls, args: Any) -> GenerateState:
        state = cls._instances.get(args.hf_checkpoint)
        if state is None:
            state = super().__new__(cls)
            state.tokenizer = load_tokenizer(args.hf_checkpoint)
            state.processor = None  # text models: a sample's multimodal_inputs are refused, not processed
            cls._instances[args.hf_checkpoint] = state
        state.args = args
        state.sampling_params = sampling_params(args)
        return state

    @property
    def semaphore(self) -> asyncio.Semaphore:
        return _state(self.args).semaphore

    @property
    def aborted(self) -> bool:
        return _state(self.args).aborted

    def reset(self) -> None:
        """Each rollout starts with fresh state here; kept for slime's callers."""


def begin_generation(args: Any) -> _GenState:
    """A fresh generation state (concurrency limit, abort flag) for the calling task and the tasks it creates."""
    state = _GenState(asyncio.Semaphore(args.sglang_server_concurrency * args.rollout_num_engines))
    _STATE.set(state)
    return state


def _state(args: Any) -> _GenState:
    """The current rollout's state; outside one (a custom rollout calling generate_and_rm directly), a fresh one."""
    state = _STATE.get(None)
    return state if state is not None else begin_generation(args)


def _generate_function(args: Any, sample: Sample) -> tuple[Callable, str]:
    """The generate function for `sample`: an eval dataset's own, else `--custom-generate-function-path`, else
    `generate`."""
    path = sample.metadata.get("generate_function_path") or args.custom_generate_function_path
    if not path:
        return generate, "generate"
    flag = "eval dataset custom_generate_function_path" if sample.metadata.get("generate_function_path") else None
    return load_function(path, flag or "--custom-generate-function-path"), path


def sampling_seed(args: Any, sample: Sample, evaluation: bool = False) -> int:
    """The engine seed of one sample under --sglang-enable-deterministic-inference: a function of --seed and the
    sample's index only, so a sample draws the same tokens whatever else the engine runs, in this run or a resumed
    one."""
    key = f"{args.seed}:{'eval' if evaluation else 'train'}:{sample.index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=7).digest(), "big")


async def generate_and_rm(
    args: Any, sample: Sample, sampling_params: dict[str, Any], evaluation: bool = False
) -> Sample | list[Sample]:
    """Generate one sample (or resume its partial response) and grade it, unless it was aborted or failed.

    A generate function may return several samples for one trajectory (agents): each is graded (unless it carries
    a reward) and trained; they share a `rollout_id` (the original sample's index unless the function set one), so
    the loss weighs the trajectory once, as slime does.

    Under `--partial-rollout --mask-offpolicy-in-partial-rollout`, the response a resumed sample brings from an
    earlier rollout (older weights) is masked out of the loss. A sample that finished in an earlier rollout comes
    back as it is."""
    if getattr(args, "partial_rollout", False) and args.mask_offpolicy_in_partial_rollout and sample.response_length:
        sample.loss_mask = [0] * sample.response_length
    if sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED):
        return sample
    if sample.status == Sample.Status.FAILED:  # a retry (a failed sample handed back under --partial-rollout)
        sample.reward = None
        sample.metadata.pop("generate_error", None)
    state = _state(args)
    fn, name = _generate_function(args, sample)
    if sample.multimodal_inputs and fn is generate:  # refused, not silently dropped from the request
        raise ValueError(
            f"sample {sample.index} carries multimodal_inputs ({sorted(sample.multimodal_inputs)}), which the default "
            "generate function does not send (the embedded engine serves text models); pass them in a "
            "--custom-generate-function-path or drop them from the data"
        )
    params = dict(sampling_params)
    if getattr(args, "sglang_enable_deterministic_inference", False):
        params["sampling_seed"] = sampling_seed(args, sample, evaluation)
    async with state.semaphore:
        if state.aborted or ROLLOUT_STOP.is_set():
            sample.status = Sample.Status.ABORTED
            return sample
        try:
            if "evaluation" in inspect.signature(fn).parameters:
                result = await fn(args, sample, params, evaluation=evaluation)
            else:
                result = await fn(args, sample, params)
        except Exception as exc:  # one broken generation must not end the rollout: mark it, count it
            sample.status = Sample.Status.FAILED
            sample.metadata["generate_error"] = f"{name}: {type(exc).__name__}: {exc}"
            logger.warning("generation failed for sample %s: %s", sample.index, sample.metadata["generate_error"])
            sample.reward = args.reward_on_error
            return sample
    if isinstance(result, list) and result and all(isinstance(s, Sample) for s in result):
        trajectory = sample.index if sample.rollout_id is None else sample.rollout_id
        for s in result:
            s.rollout_id = trajectory if s.rollout_id is None else s.rollout_id
        return list(await asyncio.gather(*(_graded(args, s, evaluation) for s in result)))
    if not isinstance(result, Sample):
        what = "a list that is empty or holds non-Samples" if isinstance(result, list) else type(result).__name__
        raise TypeError(
            f"{name} returned {what}; a generate function returns the Sample it was given, or a non-empty "
            "list[Sample] for one trajectory"
        )
    return await _graded(args, result, evaluation)


async def _graded(args: Any, sample: Sample, evaluation: bool) -> Sample:
    """A generated sample with its status settled and, unless it has one (or --group-rm grades the group), its
    reward."""
    if sample.status == Sample.Status.PENDING:
        sample.status = Sample.Status.COMPLETED  # a custom generate function that does not set the status
    if sample.status not in (Sample.Status.ABORTED, Sample.Status.FAILED) and sample.reward is None:
        if not getattr(args, "group_rm", False):
            await score_sample(args, sample, evaluation)
    return sample


async def generate_and_rm_group(
    args: Any, group: list[Sample], sampling_params: dict[str, Any], evaluation: bool = False
) -> list[Sample]:
    """Generate a group, then grade it: per sample, or in one call with `--group-rm --custom-rm-path`. Trajectories
    that came back as several samples are flattened into the group, in order."""
    done = []
    for out in await asyncio.gather(*(generate_and_rm(args, s, sampling_params, evaluation) for s in group)):
        done.extend(out if isinstance(out, list) else [out])
    if getattr(args, "group_rm", False) and not any(s.status == Sample.Status.ABORTED for s in done):
        todo = [s for s in done if s.status != Sample.Status.FAILED]
        if todo and args.custom_rm_path:
            await score_group(args, todo, evaluation)
        else:
            await asyncio.gather(*(score_sample(args, s, evaluation) for s in todo))
    return done


async def _abort_engines(args: Any, pending: set[asyncio.Task], timeout: float) -> None:
    """Abort everything the engines run until every pending group has come back (a multi-turn generate function
    may send another request after an abort, so this repeats), within `timeout` seconds."""
    router = router_url(args)
    deadline = time.monotonic() + timeout

    while pending:
        workers = [w["url"] for w in (await get(f"{router}/workers", timeout=30))["workers"]]
        await abort_all(workers)
        _, pending = await asyncio.wait(pending, timeout=0.5)
        if pending and time.monotonic() > deadline:
            for task in pending:
                task.cancel()
            raise TimeoutError(
                f"{len(pending)} groups still generating {timeout:.0f}s after aborting every engine behind {router}"
            )


async def abort_all(engine_urls: list[str]) -> None:
    """Ask every engine to abort everything it runs (its requests come back with finish reason "abort")."""

    async def abort(worker: str) -> None:
        try:
            await post(f"{worker}/abort_request", {"abort_all": True}, max_retries=2, timeout=30)
        except (ConnectionError, TimeoutError, HTTPError) as exc:  # a dead engine has nothing left to abort
            logger.warning("abort_request to %s failed: %s", worker, exc)

    await asyncio.gather(*(abort(w) for w in engine_urls))


def _fresh(sample: Sample) -> Sample:
    """The sample as the data source first handed it out: prompt, label and metadata, no response."""
    meta = {k: v for k, v in sample.metadata.items() if k not in ("start_rollout_id", "generate_error")}
    return Sample(
        group_index=sample.group_index,
        index=sample.index,
        prompt=sample.prompt,
        label=sample.label,
        metadata=meta,
        multimodal_inputs=sample.multimodal_inputs,
    )


def for_buffer(group: list[Sample], partial: bool) -> list[Sample]:
    """A group handed back unused: as it is under --partial-rollout, else (or when a trajectory came back as
    several samples, which cannot resume) one fresh sample per trajectory."""
    if partial and all(s.rollout_id is None for s in group):
        return group
    firsts: dict[int, Sample] = {}
    for number, s in zip(trajectory_numbers([s.rollout_id for s in group]), group, strict=True):
        firsts.setdefault(number, s)
    return [_fresh(s) for s in firsts.values()]


def filter_verdict(
    filt: Callable | None, args: Any, group: list[Sample], alive: int, target: int
) -> tuple[bool, str | None]:
    """(keep, why not) for a graded group. `alive`: groups kept or still generating, this one included; a rejected
    group whose filter said keep_when_insufficient is kept when dropping it would leave fewer than `target`."""
    if filt is None:
        return True, None
    try:
        out = filt(args, group)
    except Exception as exc:
        path = args.dynamic_sampling_filter_path
        raise RuntimeError(
            f"--dynamic-sampling-filter-path {path} failed on group {group[0].group_index}: {type(exc).__name__}: {exc}"
        ) from exc
    keep = bool(out.keep if isinstance(out, DynamicFilterOutput) else out)
    if not keep and isinstance(out, DynamicFilterOutput) and out.keep_when_insufficient and alive <= target:
        keep = True
    reason = (out.reason if isinstance(out, DynamicFilterOutput) else None) or "rejected"
    return keep, None if keep else str(reason)


async def _train_rollout(args: Any, rollout_id: int, data_source: Any) -> RolloutFnTrainOutput:
    """`--rollout-batch-size` groups. Prompts go out `--over-sampling-batch-size` at a time; each group is judged
    by `--dynamic-sampling-filter-path` as soon as it is graded; more prompts go out while kept + in-flight groups
    fall short; once enough groups are kept, the engines abort the rest. Groups not used go back to the data
    source's buffer: as they are under `--partial-rollout`, else as fresh prompts."""
    target = args.rollout_batch_size
    per_round = args.over_sampling_batch_size or target
    limit = args.dynamic_sampling_max_prompts or 10 * target
    path = args.dynamic_sampling_filter_path
    filt = load_function(path, "--dynamic-sampling-filter-path") if path else None
    params = sampling_params(args)
    state = begin_generation(args)  # tasks created below copy this context
    kept: list[list[Sample]] = []
    extra: list[list[Sample]] = []
    dropped: list[list[Sample]] = []
    drops: Counter[str] = Counter()
    pending: set[asyncio.Task] = set()
    submitted = resumed = 0
    start, finished = time.monotonic(), []  # seconds from the start at which each kept group was graded
    try:
        while len(kept) < target:
            while len(kept) + len(pending) < target:
                if submitted >= limit:
                    raise RuntimeError(
                        f"rollout {rollout_id}: {submitted} prompts sampled (--dynamic-sampling-max-prompts "
                        f"{limit}) and only {len(kept)} of {target} groups passed --dynamic-sampling-filter-path "
                        f"{path}; dropped: {dict(drops)}"
                    )
                groups = data_source.get_samples(min(per_round, limit - submitted))
                if not groups:
                    raise RuntimeError(
                        f"rollout {rollout_id}: the data source ({type(data_source).__name__}) "
                        f"returned no prompts with {len(kept)} of {target} groups kept"
                    )
                for group in groups:
                    for s in group:
                        s.metadata.setdefault("start_rollout_id", rollout_id)
                        resumed += bool(s.response_length)
                    pending.add(asyncio.create_task(generate_and_rm_group(args, group, params)))
                    submitted += 1
            done, pending = await asyncio.wait(pending, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if ROLLOUT_STOP.is_set():
                raise RolloutStopped(f"rollout {rollout_id} stopped: the run is stopping")
            for i, task in enumerate(done):
                group = task.result()
                alive = len(kept) + len(pending) + len(done) - i  # this group and the ones not judged yet
                keep, reason = filter_verdict(filt, args, group, alive, target)
                if not keep:
                    drops[reason] += 1
                    dropped.append(group)
                elif len(kept) < target:
                    kept.append(group)
                    finished.append(time.monotonic() - start)
                else:
                    extra.append(group)
        state.aborted = True
        aborted = len(pending)
        if pending:
            await _abort_engines(args, pending, timeout=60)
            extra += [t.result() for t in pending]
    except BaseException:
        for task in pending:
            task.cancel()
        raise
    kept.sort(key=lambda g: g[0].index)
    if args.rollout_sample_filter_path:  # slime's per-sample hook: it sets remove_sample on the kept groups
        load_function(args.rollout_sample_filter_path, "--rollout-sample-filter-path")(args, kept)
    if args.rollout_all_samples_process_path:  # every group generated, before unused ones go back to the buffer
        every = sorted(kept + dropped + extra, key=lambda g: g[0].index)
        load_function(args.rollout_all_samples_process_path, "--rollout-all-samples-process-path")(
            args, every, data_source
        )
    if extra:
        data_source.add_samples([for_buffer(g, args.partial_rollout) for g in extra])
    mean_finish, last_finish = sum(finished) / max(len(finished), 1), max(finished, default=0.0)
    metrics = {
        "rollout/submitted_groups": submitted,
        "rollout/kept_groups": len(kept),
        "rollout/dropped_groups": sum(drops.values()),
        "rollout/aborted_groups": aborted,
        "rollout/resumed_samples": resumed,
        "rollout/buffer_groups": len(getattr(data_source, "buffer", [])),
        # the long tail: when the last kept group was graded against when the average one was
        "rollout/group_seconds_mean": mean_finish,
        "rollout/group_seconds_last": last_finish,
        "rollout/group_seconds_last_over_mean": last_finish / max(mean_finish, 1e-9),
    }
    metrics |= {f"rollout/dropped/{reason}": n for reason, n in drops.items()}
    return RolloutFnTrainOutput(samples=kept, metrics=metrics)


async def _eval_rollout(args: Any, groups_by_name: dict[str, list[list[Sample]]]) -> RolloutFnEvalOutput:
    data, metrics = {}, {}
    key = reward_key(args, evaluation=True)
    configs = {c.name: c for c in args.eval_datasets}
    for name, groups in groups_by_name.items():
        t0, cfg = time.monotonic(), configs.get(name)
        if cfg is not None and cfg.custom_generate_function_path:
            for s in (s for g in groups for s in g):
                s.metadata["generate_function_path"] = cfg.custom_generate_function_path
        params = sampling_params(args, True, cfg)
        begin_generation(args)
        done = await asyncio.gather(*(generate_and_rm_group(args, g, params, evaluation=True) for g in groups))
        samples = [s for g in done for s in g]
        data[name] = {
            "rewards": [scalar_reward(s, key) for s in samples],
            "truncated": [s.status == Sample.Status.TRUNCATED for s in samples],
            "samples": samples,
        }
        metrics.update(rollout_metrics(done, time.monotonic() - t0, prefix=f"eval/{name}", key=key))
    return RolloutFnEvalOutput(data=data, metrics=metrics)


def rollout_metrics(
    groups: list[list[Sample]], seconds: float, prefix: str = "rollout", key: str | None = None
) -> dict[str, float]:
    samples = [s for g in groups for s in g]
    rewards = [r for r in (scalar_reward(s, key) for s in samples) if r is not None]
    tokens = sum(s.response_length for s in samples)
    masked = sum(s.loss_mask.count(0) for s in samples if s.loss_mask is not None)
    n = max(len(samples), 1)
    return {
        f"{prefix}/reward_mean": sum(rewards) / max(len(rewards), 1),
        f"{prefix}/response_len_mean": tokens / n,
        f"{prefix}/truncated_ratio": sum(s.status == Sample.Status.TRUNCATED for s in samples) / n,
        f"{prefix}/failed": sum(s.status == Sample.Status.FAILED for s in samples),
        f"{prefix}/reward_errors": sum("reward_error" in s.metadata for s in samples),
        f"{prefix}/tokens": tokens,
        f"{prefix}/masked_token_ratio": masked / max(tokens, 1),  # tool/environment tokens, and off-policy ones
        f"{prefix}/seconds": seconds,
        f"{prefix}/tokens_per_s": tokens / max(seconds, 1e-9),
        f"{prefix}/weight_version": max((int(v) for s in samples for v in s.weight_versions if v.isdigit()), default=0),
    }


def check_rollout(rollout_id: int, groups: list[list[Sample]]) -> None:
    """Stop a rollout with nothing to learn from, naming the first error: every generation failed, or every
    reward."""
    samples = [s for g in groups for s in g]
    if samples and all(s.status == Sample.Status.FAILED for s in samples):
        first = next((s.metadata["generate_error"] for s in samples if "generate_error" in s.metadata), "no error")
        raise RuntimeError(
            f"rollout {rollout_id}: all {len(samples)} generations failed, nothing to learn from; the first: {first}"
        )
    graded = [s for s in samples if s.status not in (Sample.Status.ABORTED, Sample.Status.FAILED)]
    if graded and all("reward_error" in s.metadata for s in graded):
        raise RuntimeError(
            f"rollout {rollout_id}: all {len(graded)} rewards failed, nothing to learn from; the "
            f"first: {graded[0].metadata['reward_error']}"
        )


def generate_rollout(
    args: Any, rollout_id: int, data_source: Any, evaluation: bool = False
) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """Training: `--rollout-batch-size` groups from `data_source` (dynamic sampling and partial rollout included).
    Evaluation: every eval dataset (`args.eval_datasets`) in full."""
    start = time.monotonic()
    if evaluation:
        return run(_eval_rollout(args, eval_groups(args)), timeout=args.rollout_timeout)
    out = run(_train_rollout(args, rollout_id, data_source), timeout=args.rollout_timeout)
    check_rollout(rollout_id, out.samples)
    out.metrics |= rollout_metrics(out.samples, time.monotonic() - start, key=reward_key(args))
    return out
