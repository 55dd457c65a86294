"""Command-line flags (slime's names and meanings) and their validation."""

from __future__ import annotations

import argparse
import json
import os


def _json_dict(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slime-train", description="RL post-training: rollout -> reward -> train -> weight sync, in a loop."
    )
    g = p.add_argument_group("model and cluster")
    g.add_argument("--hf-checkpoint", required=True, help="Hugging Face folder, or the built-in SmolLM2-135M-Instruct")
    g.add_argument("--rollout-num-engines", type=int, default=1, help="engine servers to start (CPU) behind the router")
    g.add_argument("--rollout-engine-dtype", default="float32", choices=["float32", "bfloat16"], help="engine weights")
    g.add_argument("--rollout-engine-threads", type=int, default=0, help="torch threads per engine (0: cores/engines)")
    g.add_argument("--sglang-server-concurrency", type=int, default=512, help="in-flight requests per engine, at most")
    g.add_argument("--router-policy", default="cache_aware", help="sglang-router policy (cache_aware, round_robin, …)")
    g.add_argument("--seed", type=int, default=1234, help="seed of engines' sampling")
    g.add_argument("--output-dir", default="outputs/run", help="logs, metrics and server logs go here")

    g = p.add_argument_group("data")
    g.add_argument("--prompt-data", help="JSONL or Parquet file, or builtin:arithmetic[:split][:n][:seed]")
    g.add_argument("--input-key", default="input", help="row key holding the prompt (string or chat messages)")
    g.add_argument("--label-key", default=None, help="row key holding the label passed to the reward")
    g.add_argument("--metadata-key", default="metadata", help="row key holding a dict copied to Sample.metadata")
    g.add_argument("--tool-key", default=None, help="row key holding tool definitions given to the chat template")
    g.add_argument("--apply-chat-template", action="store_true", help="format prompts with the tokenizer's template")
    g.add_argument("--apply-chat-template-kwargs", type=_json_dict, default={}, help="JSON kwargs for the template")
    g.add_argument("--rollout-shuffle", action="store_true", help="shuffle prompts, reshuffled each epoch")
    g.add_argument("--rollout-seed", type=int, default=42, help="seed of the prompt shuffle")
    g.add_argument("--rollout-max-prompt-len", type=int, default=None, help="drop prompts longer than this (tokens)")
    g.add_argument("--skip-invalid-data-rows", action="store_true", help="skip and count bad rows instead of failing")

    g = p.add_argument_group("rollout")
    g.add_argument("--num-rollout", type=int, default=1, help="rollout steps to run")
    g.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per rollout step")
    g.add_argument("--n-samples-per-prompt", type=int, default=1, help="responses sampled per prompt (a group)")
    g.add_argument("--rollout-max-response-len", type=int, default=1024, help="max new tokens per response")
    g.add_argument("--rollout-temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--rollout-top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--rollout-top-k", type=int, default=-1, help="top-k sampling (-1: off)")
    g.add_argument("--rollout-stop", nargs="*", default=None, help="stop strings")
    g.add_argument("--rollout-stop-token-ids", type=int, nargs="*", default=None, help="extra stop token ids")
    g.add_argument("--rollout-skip-special-tokens", action="store_true", help="drop special tokens from text")
    g.add_argument(
        "--rollout-function-path",
        default="slime.rollout.sglang_rollout.generate_rollout",
        help="rollout function: (args, rollout_id, data_source, evaluation=False) -> samples",
    )
    g.add_argument("--custom-generate-function-path", default=None, help="async generate(args, sample, params)")
    g.add_argument("--debug-rollout-only", action="store_true", help="run rollouts only (no training); report tok/s")
    g.add_argument("--rollout-timeout", type=float, default=3600.0, help="seconds one rollout step may take")

    g = p.add_argument_group("reward")
    g.add_argument("--rm-type", default=None, help="built-in reward: math, random")
    g.add_argument("--custom-rm-path", default=None, help="async reward(args, sample, **kw) -> float | dict")
    g.add_argument("--reward-key", default=None, help="key of the scalar when rewards are dicts")
    g.add_argument("--reward-on-error", type=float, default=0.0, help="reward of a sample whose reward function raised")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-prompt-data", nargs="*", default=None, help="NAME PATH [NAME PATH …] held-out datasets")
    g.add_argument("--n-samples-per-eval-prompt", type=int, default=1, help="responses per eval prompt")
    g.add_argument("--eval-temperature", type=float, default=None, help="eval temperature (default: rollout's)")
    g.add_argument("--eval-max-response-len", type=int, default=None, help="eval max new tokens (default: rollout's)")
    g.add_argument("--eval-interval", type=int, default=None, help="evaluate every this many rollout steps")
    g.add_argument("--skip-eval-before-train", action="store_true", help="no evaluation at step 0")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args, parser)
    return args


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse inconsistent settings with one sentence naming the flags."""
    if not args.prompt_data and args.rollout_function_path == "slime.rollout.sglang_rollout.generate_rollout":
        parser.error("--prompt-data is required by the default rollout function")
    for flag in ("rollout_batch_size", "n_samples_per_prompt", "num_rollout", "rollout_num_engines"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not args.rm_type and not args.custom_rm_path:
        parser.error("set --rm-type (e.g. math) or --custom-rm-path so samples get rewards")
    if args.eval_prompt_data is not None and (len(args.eval_prompt_data) == 0 or len(args.eval_prompt_data) % 2):
        parser.error("--eval-prompt-data takes pairs: NAME PATH [NAME PATH …]")
    if args.rollout_engine_threads == 0:
        args.rollout_engine_threads = max(1, (os.cpu_count() or 1) // args.rollout_num_engines)
    sampling = {
        "temperature": args.rollout_temperature,
        "top_p": args.rollout_top_p,
        "top_k": args.rollout_top_k,
        "max_new_tokens": args.rollout_max_response_len,
    }
    from slime.engine.sampling import SamplingParams, SamplingParamsError

    try:  # the router drops keys it does not know, so check values here rather than trust a 400
        SamplingParams.from_dict(sampling)
    except SamplingParamsError as exc:
        parser.error(f"rollout sampling flags: {exc}")
