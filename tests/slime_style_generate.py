"""A custom generate function written the way slime's documentation shows: it imports only slime.utils.types and
slime.utils.http_utils, keeps tokens / loss_mask / rollout_log_probs by hand, and calls a "tool" between two model
turns. Used by --custom-generate-function-path tests.slime_style_generate.generate."""

from transformers import AutoTokenizer

from slime.utils.http_utils import post
from slime.utils.types import Sample

_TOKENIZERS = {}


def _tokenizer(path):
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


async def generate(args, sample: Sample, sampling_params) -> Sample:
    tokenizer = _tokenizer(args.hf_checkpoint)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    prompt_ids = tokenizer.encode(sample.prompt, add_special_tokens=False)
    budget = sampling_params["max_new_tokens"]
    response_ids, loss_mask, log_probs, text = [], [], [], ""

    async def model_turn(max_new):
        params = dict(sampling_params, max_new_tokens=max_new)
        out = await post(
            url, {"input_ids": prompt_ids + response_ids, "sampling_params": params, "return_logprob": True}
        )
        pairs = out["meta_info"]["output_token_logprobs"]
        response_ids.extend(p[1] for p in pairs)
        log_probs.extend(p[0] for p in pairs)
        loss_mask.extend([1] * len(pairs))
        return out

    out = await model_turn(max(1, budget // 3))
    text += out["text"]
    tool_ids = tokenizer.encode("\n[tool] 2+2=4\n", add_special_tokens=False)
    sample.metadata["tool_span"] = (len(response_ids), len(response_ids) + len(tool_ids))
    response_ids.extend(tool_ids)
    loss_mask.extend([0] * len(tool_ids))
    log_probs.extend([0.0] * len(tool_ids))
    text += "\n[tool] 2+2=4\n"
    out = await model_turn(max(1, budget - len(response_ids)))
    text += out["text"]
    sample.metadata["turns"] = 2

    sample.tokens = prompt_ids + response_ids
    sample.response = text
    sample.response_length = len(response_ids)
    sample.loss_mask = loss_mask
    sample.rollout_log_probs = log_probs
    finish = out["meta_info"]["finish_reason"]["type"]
    sample.status = {"length": Sample.Status.TRUNCATED, "abort": Sample.Status.ABORTED}.get(
        finish, Sample.Status.COMPLETED
    )
    return sample
