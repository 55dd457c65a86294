"""A multi-turn generate function in the shape of slime's current example agents (search-r1, retool): it takes the
tokenizer and sampling parameters from `slime.rollout.sglang_rollout.GenerateState`, extends the sample with
`Sample.append_response_tokens` (model turns with the engine's meta_info, an observation with trainable=False), and
grades with `slime.rollout.rm_hub.math_dapo_utils.compute_score`. Used by --custom-generate-function-path and
--custom-rm-path tests.slime_agent_generate:generate / :reward."""

from slime.rollout.rm_hub.math_dapo_utils import compute_score
from slime.rollout.sglang_rollout import GenerateState
from slime.utils.http_utils import post
from slime.utils.types import Sample

OBSERVATION = "\n<observation>the tool answered 4</observation>\n"


async def generate(args, sample: Sample, sampling_params) -> Sample:
    state = GenerateState(args)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    sample.tokens = state.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    budget = sampling_params["max_new_tokens"]
    for turn in range(2):
        left = budget - sample.response_length
        if left <= 0:
            break
        params = dict(sampling_params, max_new_tokens=max(1, left // (2 - turn)))
        out = await post(url, {"input_ids": sample.tokens, "sampling_params": params, "return_logprob": True})
        pairs = out["meta_info"]["output_token_logprobs"]
        sample.append_response_tokens(
            args,
            tokens=[p[1] for p in pairs],
            log_probs=[p[0] for p in pairs],
            meta_info=out["meta_info"],
            text=out["text"],
        )
        if turn == 0:
            obs = state.tokenizer(OBSERVATION, add_special_tokens=False)["input_ids"]
            sample.metadata["observation_span"] = (sample.response_length, sample.response_length + len(obs))
            sample.append_response_tokens(args, tokens=obs, trainable=False, text=OBSERVATION)
    return sample


async def reward(args, sample: Sample, **kwargs) -> float:
    return compute_score(sample.response, str(sample.label), strict_box_verify=True)["score"]
