"""Hooks written against slime's documented signatures, importing only its public paths."""

from slime.utils.types import Sample


async def length_reward(args, sample: Sample, **kwargs) -> float:
    return float(sample.response_length)


async def failing_reward(args, sample: Sample, **kwargs) -> float:
    raise RuntimeError("grader exploded")


async def token_reward(args, sample: Sample, **kwargs) -> float:
    """The share of response tokens with an id below 16384, a third of the test tokenizer's vocabulary: a signal a
    random tiny model can climb, dense enough that a group of 4 short responses almost never ties (a rarer token
    left whole rollouts at reward 0, hence zero advantages and zero gradients, on some sampler seeds)."""
    ids = sample.tokens[len(sample.tokens) - sample.response_length :]
    return sum(t < 16384 for t in ids) / max(len(ids), 1)


def reinforce_loss(args, batch, logits, sum_of_sample_mean):
    """A --custom-loss-function-path written against slime's signature: vanilla REINFORCE, -A * log p."""
    loss = sum_of_sample_mean(-batch["advantages"] * batch["log_probs"])
    return loss, {"custom_pg_loss": loss.detach(), "logits_rows": sum_of_sample_mean(logits.new_ones(logits.shape[0]))}


async def slow_reward(args, sample: Sample, **kwargs) -> float:
    import asyncio

    await asyncio.sleep(30)
    return 1.0


async def group_rank_reward(args, samples: list[Sample], **kwargs) -> list[float]:
    """A --group-rm reward: 1 for the group's longest response, 0 for the others (needs the whole group)."""
    longest = max(len(s.response) for s in samples)
    return [float(len(s.response) == longest) for s in samples]


async def none_reward(args, sample: Sample, **kwargs):
    return None  # a common bug: a forgotten return


async def dict_reward(args, sample: Sample, **kwargs) -> dict:
    return {"score": float(len(sample.response)), "acc": sample.response == sample.label}


async def group_size_reward(args, samples: list[Sample], **kwargs) -> float:
    return float(len(samples))  # wrong for --group-rm: one value instead of one per sample


SEEN_ROLLOUT_IDS: list = []


def pop_last(args, rollout_id, buffer: list[list[Sample]], num_samples: int) -> list[list[Sample]]:
    """A --buffer-filter-path: newest groups first (records the rollout id it was called for)."""
    SEEN_ROLLOUT_IDS.append(rollout_id)
    out = [buffer.pop() for _ in range(min(num_samples, len(buffer)))]
    return out


def keep_even_groups(args, samples: list[Sample], **kwargs):
    """A --dynamic-sampling-filter-path rejecting every group with an odd group index (half of them)."""
    from slime.rollout.filter_hub.base_types import DynamicFilterOutput

    keep = samples[0].group_index % 2 == 0
    return DynamicFilterOutput(keep=keep, reason=None if keep else "odd_group")


def keep_even_groups_with_fallback(args, samples: list[Sample], **kwargs):
    """`keep_even_groups`, but a rejected group is kept when the step would otherwise fall short."""
    out = keep_even_groups(args, samples)
    out.keep_when_insufficient = True
    return out


def rank_post_process(args, samples: list[Sample]):
    """A --custom-reward-post-process-path: scores are the raw rewards minus 1 (no group normalisation)."""
    raw = [s.get_reward_value(args) for s in samples]
    return raw, [r - 1.0 for r in raw]


async def first_groups_short(args, sample: Sample, sampling_params) -> Sample:
    """A custom generate delegating to the default: groups 0 and 1 stop after 4 tokens, so they finish while the
    others are mid-response (a deterministic stand-in for prompts of different difficulty)."""
    from slime.rollout.sglang_rollout import generate

    if sample.group_index < 2:
        sampling_params = dict(sampling_params, max_new_tokens=4)
    return await generate(args, sample, sampling_params)


def nan_loss(args, batch, logits, sum_of_sample_mean):
    """A --custom-loss-function-path whose loss is NaN (with a gradient), to exercise the skipped-update path."""
    loss = sum_of_sample_mean(batch["log_probs"]) * float("nan")
    return loss, {}


_GENERATE_CALLS = [0]


def _engine_pid(args, index: int) -> int:
    """The pid of engine `index`, as the fleet records where its engines run (server_logs/engines.json)."""
    import json
    import os

    with open(os.path.join(args.output_dir, "server_logs", "engines.json")) as f:
        return next(e["pid"] for e in json.load(f) if e["index"] == index)


def _engine_off_the_head_node(args) -> int:
    """The index of the engine running on a node other than the Ray head node (a multi-node test cluster)."""
    import json
    import os

    import ray

    heads = {n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n.get("Resources", {})}
    with open(os.path.join(args.output_dir, "server_logs", "engines.json")) as f:
        return next(e["index"] for e in json.load(f) if e["node_id"] not in heads)


async def kill_worker_node_engine_generate(args, sample: Sample, sampling_params: dict) -> Sample:
    """Rollout 1 SIGKILLs the engine on the Ray worker node (not the head)."""
    import signal

    return await _sabotage_in_rollout_1(args, sample, sampling_params, _engine_off_the_head_node, signal.SIGKILL)


async def _sabotage_in_rollout_1(args, sample: Sample, sampling_params: dict, engine, sig: int) -> Sample:
    """The default generate; the first call of rollout 1 sends `sig` to engine `engine` (an index, or a function of
    args giving it), with the rollout's other requests in flight (4 x 4 samples per rollout)."""
    import os

    from slime.rollout.sglang_rollout import generate

    _GENERATE_CALLS[0] += 1
    if _GENERATE_CALLS[0] == 17:
        os.kill(_engine_pid(args, engine if isinstance(engine, int) else engine(args)), sig)
    return await generate(args, sample, sampling_params)


async def hang_engine_generate(args, sample: Sample, sampling_params: dict) -> Sample:
    """Rollout 1 SIGSTOPs engine 1: alive but silent."""
    import signal

    return await _sabotage_in_rollout_1(args, sample, sampling_params, 1, signal.SIGSTOP)


def rank1_raises_loss(args, batch, logits, sum_of_sample_mean):
    """A --custom-loss-function-path that raises on training rank 1 only (rank 0 then waits in a collective)."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("custom loss exploded on purpose")
    return reinforce_loss(args, batch, logits, sum_of_sample_mean)


def groups_only_rollout(args, rollout_id, data_source, evaluation=False):
    """A --rollout-function-path returning the groups alone (no metrics), as older slime rollout functions do."""
    from slime.rollout.sglang_rollout import generate_rollout

    return generate_rollout(args, rollout_id, data_source, evaluation).samples


async def exploding_generate(args, sample: Sample, sampling_params: dict) -> Sample:
    """A --custom-generate-function-path that fails on every sample."""
    raise RuntimeError("the agent's tool server is down")


class SlimeStyleDataSource:
    """A data source with slime's save(rollout_id) / load(rollout_id) and no state_dict: it keeps its own file."""

    def __init__(self, args, folder):
        self.args, self.folder, self.position = args, folder, 0

    def save(self, rollout_id):
        (self.folder / f"state_{rollout_id}.txt").write_text(str(self.position))

    def load(self, rollout_id=None):
        self.position = int((self.folder / f"state_{rollout_id}.txt").read_text())


def slime_signature_tis(args, *, pg_loss, train_log_probs, rollout_log_probs, loss_masks, **kwargs):
    """A TIS/MIS hook with slime's signature: clipped importance weights, and tokens with a ratio above 1.5
    rejected."""
    import torch

    ratio = torch.exp(torch.cat(train_log_probs) - torch.cat(rollout_log_probs))
    keep = [
        (torch.exp(t - r) <= 1.5).to(m.dtype) * m
        for t, r, m in zip(train_log_probs, rollout_log_probs, loss_masks, strict=True)
    ]
    return pg_loss * ratio.clamp(0.0, 2.0), keep, {"tis": ratio.detach()}


async def token_rewards(args, samples: list[Sample], **kwargs) -> list[float]:
    """`token_reward` for a list (slime's group-reward convention, as batched_async_rm calls it)."""
    return [await token_reward(args, s) for s in samples]


def _record(args, **entry) -> None:
    """Hooks below append what they saw to <output_dir>/hooks.jsonl, for tests to read back."""
    import json
    import os

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "hooks.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


def remove_first_sample(args, groups: list[list[Sample]]) -> None:
    """--rollout-sample-filter-path: leave the first sample of every group out of the loss."""
    for g in groups:
        g[0].remove_sample = True
    _record(args, hook="sample_filter", groups=len(groups))


def count_all_groups(args, groups: list[list[Sample]], data_source) -> None:
    """--rollout-all-samples-process-path."""
    _record(args, hook="all_samples", groups=len(groups), source=type(data_source).__name__)


def log_rollout_myself(rollout_id, args, samples, metrics, seconds) -> bool:
    """--custom-rollout-log-function-path: records, and asks for the standard metrics to be dropped."""
    _record(args, hook="rollout_log", rollout_id=rollout_id, samples=len(samples), value=args.my_hook_value)
    return True


def log_eval_myself(rollout_id, args, data, metrics) -> bool:
    _record(args, hook="eval_log", rollout_id=rollout_id, datasets=sorted(data))
    return True


def convert_like_slime(args, samples: list[Sample]) -> dict:
    """--custom-convert-samples-to-train-data-path: slime's dict of per-sample lists."""
    _record(args, hook="convert", samples=len(samples))
    return {
        "tokens": [s.tokens for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "rewards": [float(s.reward) for s in samples],
        "loss_masks": [s.loss_mask or [1] * s.response_length for s in samples],
        "rollout_log_probs": [s.rollout_log_probs for s in samples],
        "rollout_ids": [s.rollout_id for s in samples],
    }


def constant_advantages(args, rollout_data: dict) -> None:
    """--custom-advantage-function-path: 0.25 on every token."""
    import torch

    rollout_data["advantages"] = [torch.full((r,), 0.25) for r in rollout_data["response_lengths"]]
    rollout_data["returns"] = rollout_data["advantages"]


def double_advantages(args, rollout_id: int, rollout_data: dict) -> None:
    """--rollout-data-postprocess-path."""
    rollout_data["advantages"] = [a * 2 for a in rollout_data["advantages"]]


async def returns_a_number(args, sample: Sample, sampling_params: dict) -> int:
    """A broken --custom-generate-function-path: returns something that is not a Sample."""
    return 42


def record_entropy(args, rollout_id: int, rollout_data: dict) -> None:
    """--rollout-data-postprocess-path under --use-rollout-entropy: records the entropy column's shape."""
    entropy = rollout_data["entropy"]
    ok = [tuple(e.shape) == (r,) for e, r in zip(entropy, rollout_data["response_lengths"], strict=True)]
    _record(args, hook="entropy", all_shaped=all(ok), positive=all(bool((e > 0).all()) for e in entropy))


async def stalls_after_first_rollout(args, sample: Sample, **kwargs) -> float:
    """token_reward in rollout 0; from rollout 1 on, grading stalls for 10 minutes: a rollout only a stop ends. The
    file named by $SLIME_TEST_STALL_MARK is created when the stall begins."""
    import asyncio
    import os

    if sample.metadata.get("start_rollout_id", 0) >= 1:
        if os.environ.get("SLIME_TEST_STALL_MARK"):
            open(os.environ["SLIME_TEST_STALL_MARK"], "a").close()
        await asyncio.sleep(600)
    return await token_reward(args, sample)
