"""A generate function in the shape of slime's multi-agent example: for each sample it runs a few "solver" calls
and one "reviewer" call, each its own training Sample (deep copies of the input), grades them with
`rm_hub.batched_async_rm`, scales the reviewer's reward, and returns them all as `list[Sample]`. Like the example, it
deep-copies `args` and hangs run state on the copy. Used by --custom-generate-function-path
tests.slime_multi_agent_generate:generate."""

import asyncio
from copy import deepcopy

from slime.rollout.rm_hub import batched_async_rm
from slime.utils.http_utils import post
from slime.utils.types import Sample

SOLVERS = 2


async def _call(args, prompt: str, role: str) -> Sample:
    sample = deepcopy(args.sample)
    sample.prompt = prompt
    sample.tokens = args.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    out = await post(url, {"input_ids": sample.tokens, "sampling_params": args.sampling_params, "return_logprob": True})
    pairs = out["meta_info"]["output_token_logprobs"]
    sample.append_response_tokens(
        args, tokens=[p[1] for p in pairs], log_probs=[p[0] for p in pairs], meta_info=out["meta_info"]
    )
    sample.response = out["text"]
    sample.metadata = dict(sample.metadata, role=role)
    args.results[role].append(sample)
    return sample


async def generate(args, sample: Sample, sampling_params, evaluation=False) -> list[Sample]:
    from transformers import AutoTokenizer

    args = deepcopy(args)
    args.tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
    args.sampling_params = sampling_params
    args.sample = sample
    args.results = {"solver": [], "reviewer": []}
    solutions = await asyncio.gather(*(_call(args, sample.prompt, "solver") for _ in range(SOLVERS)))
    review = sample.prompt + "\nCandidates: " + " | ".join(s.response[:40] for s in solutions) + "\nBest:"
    await _call(args, review, "reviewer")
    out = args.results["solver"] + args.results["reviewer"]
    for s, r in zip(out, await batched_async_rm(args, out), strict=True):
        s.reward = r * (0.5 if s.metadata["role"] == "reviewer" else 1.0)
    return out
