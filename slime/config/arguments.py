"""Command-line flags (slime's names and meanings) and their validation."""

from __future__ import annotations

import argparse
import json
import logging
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
    g.add_argument(
        "--rollout-num-engines", type=int, default=1,
        help="engine servers to start behind the router on CPU (on GPUs: one per GPU, see --rollout-num-gpus)",
    )  # fmt: skip
    g.add_argument(
        "--rollout-num-gpus", type=int, default=None,
        help="GPUs for engines of their own, beside the training GPUs (one engine each; weight sync by NCCL); "
        "unset: engines share the training GPUs",
    )  # fmt: skip
    g.add_argument("--rollout-num-gpus-per-engine", type=int, default=1, help="GPUs per engine (the embedded: 1)")
    g.add_argument(
        "--colocate", action="store_true",
        help="engines on the training GPUs, taking turns: engines release weights and KV cache while the trainer "
        "trains, the trainer moves to CPU while engines generate (implies --offload-train and --offload-rollout)",
    )  # fmt: skip
    g.add_argument(
        "--rollout-engine-dtype", default=None, choices=["float32", "bfloat16"],
        help="engine weights and compute (default: bfloat16 on GPU, float32 on CPU)",
    )  # fmt: skip
    g.add_argument(
        "--sglang-max-running-requests", type=int, default=None,
        help="requests one engine decodes together (batch rows; default 256 on GPU, 64 on CPU)",
    )  # fmt: skip
    g.add_argument(
        "--rollout-engine-backend", default="auto", choices=["auto", "paged", "padded"],
        help="embedded engine backend: paged (block-paged KV cache, prefix sharing, CUDA-graph decode), padded (one "
        "padded transformers cache; any model, including sliding-window or soft-capped attention) or auto (paged "
        "where it can serve the model, else padded with a warning)",
    )  # fmt: skip
    g.add_argument(
        "--sglang-mem-fraction-static", type=float, default=None,
        help="fraction of an engine GPU's memory the engine holds for weights and KV cache (default: 0.85 on GPUs of "
        "its own, 0.6 colocated, 0.35 beside a resident trainer)",
    )  # fmt: skip
    g.add_argument(
        "--sglang-chunked-prefill-size", type=int, default=None,
        help="prompt tokens an engine computes per prefill pass; longer prompts go in chunks (default 8192 GPU, "
        "4096 CPU)",
    )  # fmt: skip
    g.add_argument("--sglang-page-size", type=int, default=16, help="tokens per KV cache block of the paged backend")
    g.add_argument("--sglang-disable-cuda-graph", action="store_true", help="engines run decode steps eagerly")
    g.add_argument(
        "--sglang-disable-torch-compile", action="store_true",
        help="GPU engines skip torch.compile of the decode step's norms and sampler (starts faster, decodes slower)",
    )  # fmt: skip
    g.add_argument(
        "--sglang-cuda-graph-max-bs", type=int, default=512, help="largest batch an engine captures a decode graph for"
    )
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
    g.add_argument(
        "--tool-key", default=None,
        help="row key holding tool definitions given to the chat template (default: the metadata's 'tools', if any)",
    )  # fmt: skip
    g.add_argument("--apply-chat-template", action="store_true", help="format prompts with the tokenizer's template")
    g.add_argument("--apply-chat-template-kwargs", type=_json_dict, default={}, help="JSON kwargs for the template")
    g.add_argument("--rollout-shuffle", action="store_true", help="shuffle prompts, reshuffled each epoch")
    g.add_argument("--rollout-seed", type=int, default=42, help="seed of the prompt shuffle")
    g.add_argument("--rollout-max-prompt-len", type=int, default=None, help="drop prompts longer than this (tokens)")
    g.add_argument("--skip-invalid-data-rows", action="store_true", help="skip and count bad rows instead of failing")
    g.add_argument(
        "--rollout-global-dataset", action="store_true", default=True,
        help="the rollout manager serves --prompt-data to the rollout function (the default; kept for slime scripts)",
    )  # fmt: skip
    g.add_argument(
        "--disable-rollout-global-dataset", action="store_false", dest="rollout_global_dataset",
        help="no shared dataset: a custom --rollout-function-path brings its own prompts",
    )  # fmt: skip

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
    g.add_argument(
        "--custom-generate-function-path", default=None,
        help="async generate(args, sample, sampling_params[, evaluation]) -> Sample, replacing the one-call default "
        "(multi-turn, tools: slime.rollout.multi_turn)",
    )  # fmt: skip
    g.add_argument(
        "--data-source-path", default="slime.rollout.data_source.RolloutDataSourceWithBuffer",
        help="class built as cls(args) with get_samples(num_prompts), add_samples(groups) and __len__",
    )  # fmt: skip
    g.add_argument(
        "--over-sampling-batch-size", type=int, default=None,
        help="prompts submitted at a time while the step has too few groups (default --rollout-batch-size); "
        "more than --rollout-batch-size lets --dynamic-sampling-filter-path drop groups without waiting",
    )  # fmt: skip
    g.add_argument(
        "--dynamic-sampling-filter-path", default=None,
        help="fn(args, group, **kw) -> DynamicFilterOutput | bool judging each graded group; dropped groups are "
        "replaced by new prompts (e.g. slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std)",
    )  # fmt: skip
    g.add_argument(
        "--dynamic-sampling-max-prompts", type=int, default=None,
        help="prompts one rollout step may sample before it stops with the drop reasons (default 10 x "
        "--rollout-batch-size)",
    )  # fmt: skip
    g.add_argument(
        "--partial-rollout", action="store_true",
        help="groups aborted when the step is full keep their partial responses in the buffer and resume in the "
        "next rollout with the remaining token budget (without it they return as fresh prompts)",
    )  # fmt: skip
    g.add_argument(
        "--mask-offpolicy-in-partial-rollout", action="store_true",
        help="--partial-rollout: leave the tokens a resumed sample brought from an earlier rollout out of the loss",
    )  # fmt: skip
    g.add_argument(
        "--buffer-filter-path", default=None,
        help="fn(args, rollout_id, buffer, num_samples) -> groups taken out of the buffer (default: pop_first)",
    )  # fmt: skip
    g.add_argument("--debug-rollout-only", action="store_true", help="run rollouts only (no training); report tok/s")
    g.add_argument("--rollout-timeout", type=float, default=3600.0, help="seconds one rollout step may take")
    g.add_argument(
        "--sglang-enable-deterministic-inference", action="store_true",
        help="reproducible rollouts: every request samples with its own seed (from --seed and the sample's index) "
        "and each engine runs one request at a time, so results do not depend on batching (slow; for resume checks "
        "and research)",
    )  # fmt: skip

    g = p.add_argument_group("training")
    g.add_argument("--actor-num-nodes", type=int, default=1, help="nodes of training ranks")
    g.add_argument(
        "--actor-num-gpus-per-node", type=int, default=1,
        help="training ranks per node: one per GPU, or one process each on CPU (world size = nodes x this)",
    )  # fmt: skip
    g.add_argument("--train-threads", type=int, default=0, help="torch threads per CPU training rank (0: cores/ranks)")
    g.add_argument(
        "--ref-load", default=None,
        help="reference model for the KL terms: a Hugging Face folder or a --save folder (default: --hf-checkpoint)",
    )  # fmt: skip
    g.add_argument("--lr", type=float, default=1e-6, help="peak learning rate of AdamW")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of linear/cosine decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="optimizer steps of linear warm-up from 0")
    g.add_argument(
        "--lr-decay-style", default="constant", choices=["constant", "linear", "cosine"], help="schedule after warm-up"
    )
    g.add_argument("--lr-decay-iters", type=int, default=None, help="optimizer steps of decay (default: the whole run)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--global-batch-size", type=int, default=None, help="samples per optimizer step (all ranks)")
    g.add_argument("--num-steps-per-rollout", type=int, default=None, help="optimizer steps per rollout")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per forward/backward on one rank")
    g.add_argument(
        "--use-dynamic-batch-size", action="store_true",
        help="pack micro-batches by tokens (--max-tokens-per-gpu) instead of --micro-batch-size samples",
    )  # fmt: skip
    g.add_argument("--max-tokens-per-gpu", type=int, default=None, help="tokens per packed micro-batch on one rank")
    g.add_argument(
        "--log-probs-max-tokens-per-gpu", type=int, default=None,
        help="tokens per packed pass when computing old/ref/teacher log-probs and values (no gradient, so it can be "
        "larger; default --max-tokens-per-gpu, or --micro-batch-size samples)",
    )  # fmt: skip
    g.add_argument(
        "--balance-data", action="store_true",
        help="split each optimizer step over ranks by token count (Karmarkar-Karp) instead of round-robin",
    )  # fmt: skip
    g.add_argument(
        "--offload-train", action="store_true",
        help="between training steps, keep the trainer's weights and optimizer state on CPU (GPU ranks only): frees "
        "the GPU for rollout engines sharing it; the log shows torch.cuda.memory_allocated before and after",
    )  # fmt: skip
    g.add_argument(
        "--offload-rollout", action="store_true",
        help="engines release their weights and KV cache while the trainer trains and take them back before the "
        "weight sync; each engine's log shows torch.cuda.memory_allocated before and after",
    )  # fmt: skip
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0, help="timeout of training collectives")
    g.add_argument(
        "--train-timeout", type=float, default=3600.0,
        help="seconds to wait for the training ranks to load, train on one rollout, or sync weights",
    )  # fmt: skip

    g = p.add_argument_group("checkpoints and faults")
    g.add_argument(
        "--save", default=None,
        help="folder of checkpoints (iter_XXXXXXX/ + latest_checkpointed_iteration.txt); saved every --save-interval "
        "rollouts and after the last one",
    )  # fmt: skip
    g.add_argument("--save-interval", type=int, default=None, help="rollouts between checkpoints (needs --save)")
    g.add_argument(
        "--load", default=None,
        help="resume from the newest complete checkpoint in this folder; a folder without one starts a fresh run "
        "(so the same command both starts and resumes when --load equals --save)",
    )  # fmt: skip
    g.add_argument("--no-save-optim", action="store_true", help="leave optimizer state out of checkpoints (smaller; "
                   "a resume then restarts AdamW's moments)")  # fmt: skip
    g.add_argument("--no-load-optim", action="store_true", help="resume weights but start a fresh optimizer")
    g.add_argument("--no-load-rng", action="store_true", help="resume without restoring the saved RNG states")
    g.add_argument(
        "--save-hf", default=None,
        help="also export the policy as a Hugging Face folder at each checkpoint; the path may contain {rollout_id}",
    )  # fmt: skip
    g.add_argument(
        "--max-nan-steps", type=int, default=3,
        help="optimizer steps with a non-finite loss or gradient norm are skipped; stop the run once more than this "
        "many were skipped",
    )  # fmt: skip
    g.add_argument(
        "--use-fault-tolerance", action="store_true",
        help="health-check engines during rollouts; restart a dead or hung one, give it the current weights, "
        "re-register it with the router, and retry its in-flight requests",
    )  # fmt: skip
    g.add_argument("--rollout-health-check-interval", type=float, default=30.0,
                   help="seconds between engine health checks (/health_generate) during a rollout")  # fmt: skip
    g.add_argument("--rollout-health-check-timeout", type=float, default=30.0,
                   help="seconds an engine may take to answer a health check before it is restarted")  # fmt: skip
    g.add_argument("--rollout-health-check-first-wait", type=float, default=0.0,
                   help="seconds after an engine (re)starts before its first health check")  # fmt: skip

    g = p.add_argument_group("algorithm")
    g.add_argument(
        "--advantage-estimator", default="grpo",
        help="grpo, gspo, reinforce_plus_plus, reinforce_plus_plus_baseline, ppo (with a critic) or "
        "on_policy_distillation (docs/algorithms.md)",
    )  # fmt: skip
    g.add_argument(
        "--loss-type", default="policy_loss", choices=["policy_loss", "sft_loss", "custom_loss"],
        help="policy_loss: PPO-clip (GSPO for --advantage-estimator gspo); sft_loss: NLL of loss-masked tokens; "
        "custom_loss: --custom-loss-function-path",
    )  # fmt: skip
    g.add_argument("--custom-loss-function-path", default=None, help="fn(args, batch, logits, sum_of_sample_mean)")
    g.add_argument(
        "--custom-pg-loss-reducer-function-path", default=None,
        help="fn(total_lengths, response_lengths, loss_masks, calculate_per_token_loss) -> reducer of the policy "
        "loss; slime.algorithms.losses:dr_grpo_pg_loss_reducer is Dr. GRPO's constant normaliser",
    )  # fmt: skip
    g.add_argument(
        "--disable-grpo-std-normalization", action="store_true", help="GRPO: only subtract the group mean reward"
    )
    g.add_argument(
        "--normalize-advantages", action="store_true",
        help="whiten advantages over all loss-masked tokens of the rollout (implied by reinforce_plus_plus*)",
    )  # fmt: skip
    g.add_argument("--gamma", type=float, default=1.0, help="discount per token (reinforce_plus_plus*, ppo)")
    g.add_argument("--lambd", type=float, default=1.0, help="GAE lambda (ppo)")
    g.add_argument("--eps-clip", type=float, default=0.2, help="PPO clip range below (and above) ratio 1")
    g.add_argument("--eps-clip-high", type=float, default=None, help="PPO clip range above 1 (default: --eps-clip)")
    g.add_argument("--eps-clip-c", type=float, default=None, help="dual-clip bound (> 1) for negative advantages")
    g.add_argument("--entropy-coef", type=float, default=0.0, help="weight of the entropy bonus in the loss")
    g.add_argument("--use-kl-loss", action="store_true", help="add a KL penalty to the frozen reference model")
    g.add_argument("--kl-loss-coef", type=float, default=0.0, help="weight of the KL loss")
    g.add_argument(
        "--kl-loss-type", default="k1", choices=["k1", "k2", "k3", "low_var_kl"],
        help="KL estimator of the KL loss and of the --kl-coef reward penalty",
    )  # fmt: skip
    g.add_argument(
        "--kl-coef", type=float, default=0.0,
        help="KL to the reference as a reward penalty: per token for reinforce_plus_plus* and ppo, summed over "
        "the response for grpo/gspo (exclusive with --use-kl-loss)",
    )  # fmt: skip
    g.add_argument(
        "--calculate-per-token-loss", action="store_true",
        help="average the loss over all tokens of the global batch (default: per-sample token mean, then sample mean)",
    )  # fmt: skip
    g.add_argument(
        "--use-rollout-logprobs", action="store_true",
        help="use the engine's log-probs as the PPO old policy instead of recomputing them before training",
    )  # fmt: skip
    g.add_argument("--critic-load", default=None, help="ppo: critic backbone (default: --hf-checkpoint)")
    g.add_argument("--critic-lr", type=float, default=None, help="ppo: peak learning rate of the critic (default --lr)")
    g.add_argument("--value-clip", type=float, default=0.2, help="ppo: clip of the value update per step (0: off)")

    g = p.add_argument_group("train/inference mismatch")
    g.add_argument("--use-tis", action="store_true", help="weight the policy loss by pi_old / pi_rollout, clipped")
    g.add_argument("--tis-clip", type=float, default=2.0, help="TIS: upper bound of the importance weight")
    g.add_argument("--tis-clip-low", type=float, default=0.0, help="TIS: lower bound of the importance weight")
    g.add_argument("--tis-level", default="token", choices=["token", "sequence", "geometric"], help="TIS ratio level")
    g.add_argument(
        "--use-mis", action="store_true",
        help="mask tokens (or samples) whose pi_old / pi_rollout lies outside [--mis-lower-bound, --mis-upper-bound]",
    )  # fmt: skip
    g.add_argument("--mis-level", default="token", choices=["token", "sequence", "geometric"], help="MIS ratio level")
    g.add_argument("--mis-lower-bound", type=float, default=0.5, help="MIS: smallest kept ratio")
    g.add_argument("--mis-upper-bound", type=float, default=2.0, help="MIS: largest kept ratio")
    g.add_argument(
        "--mis-veto-threshold",
        type=float,
        default=None,
        help="MIS: drop a whole sample with any token ratio below this",
    )
    g.add_argument("--custom-tis-function-path", default=None, help="replaces the TIS/MIS weights (corrections.py)")

    g = p.add_argument_group("on-policy distillation")
    g.add_argument(
        "--use-opd", action="store_true", help="add -opd_kl_coef x (log p_old - log p_teacher) to advantages"
    )
    g.add_argument(
        "--opd-type", default=None, choices=["model", "megatron", "sglang"],
        help="model (slime: megatron): --opd-teacher-load runs in the trainer; sglang: the reward or generate "
        "function sets Sample.teacher_log_probs",
    )  # fmt: skip
    g.add_argument("--opd-kl-coef", type=float, default=1.0, help="weight of the distillation term")
    g.add_argument("--opd-teacher-load", default=None, help="teacher Hugging Face folder (same tokenizer)")

    g = p.add_argument_group("weight sync")
    g.add_argument(
        "--update-weight-mode", default=None, choices=["tensor", "distributed", "disk"],
        help="how new weights reach engines: shared memory / CUDA IPC, a gloo / NCCL broadcast, or files (default: "
        "tensor, or distributed when engines have GPUs of their own)",
    )  # fmt: skip
    g.add_argument(
        "--update-weight-buffer-size", type=int, default=512 * 1024**2, help="bytes of weights sent per bucket"
    )
    g.add_argument("--update-weight-timeout", type=float, default=600.0, help="seconds any weight-sync step may take")

    g = p.add_argument_group("reward")
    g.add_argument(
        "--rm-type", default=None,
        help="built-in reward (docs/rewards.md): math, deepscaler, dapo, f1, gpqa, ifeval, random, remote_rm; "
        "boxed_math / boxed_gpqa grade only the last \\boxed{}",
    )  # fmt: skip
    g.add_argument(
        "--custom-rm-path", default=None,
        help="module:function, async (args, sample, **kw) -> float | dict; with --group-rm (args, samples, **kw) "
        "-> one reward per sample",
    )  # fmt: skip
    g.add_argument(
        "--custom-reward-post-process-path", default=None,
        help="fn(args, samples) -> (raw_rewards, rewards), one per sample; its rewards replace the group "
        "normalisation of grpo/gspo/reinforce_plus_plus_baseline",
    )  # fmt: skip
    g.add_argument("--reward-key", default=None, help="key of the scalar when rewards are dicts")
    g.add_argument("--eval-reward-key", default=None, help="key of the scalar in eval rewards (default --reward-key)")
    g.add_argument(
        "--group-rm", action="store_true",
        help="reward each group once it is fully generated; --custom-rm-path then gets the whole group in one call",
    )  # fmt: skip
    g.add_argument("--rm-url", default=None, help="remote_rm: URL that answers POST {prompt, response, label}")
    g.add_argument(
        "--rm-max-retries", type=int, default=3, help="remote_rm: retries after a connection error or 5xx answer"
    )
    g.add_argument(
        "--reward-on-error", type=float, default=0.0,
        help="reward of a sample whose reward function raised or timed out (the sample is marked and counted)",
    )  # fmt: skip
    g.add_argument(
        "--rm-timeout", type=float, default=60.0,
        help="seconds one reward call may take (one sample, or one group with --group-rm; retries included)",
    )  # fmt: skip

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-prompt-data", nargs="*", default=None, help="NAME PATH [NAME PATH …] held-out datasets")
    g.add_argument(
        "--eval-config", default=None,
        help="YAML of eval datasets with per-dataset rm_type, keys and sampling (slime.utils.eval_config)",
    )  # fmt: skip
    g.add_argument(
        "--eval-function-path", default=None,
        help="rollout function used for evaluation (default: --rollout-function-path), called with evaluation=True",
    )  # fmt: skip
    g.add_argument(
        "--n-samples-per-eval-prompt", type=int, default=1, help="responses per eval prompt (pass@k up to it)"
    )
    g.add_argument("--eval-temperature", type=float, default=None, help="eval temperature (default: rollout's)")
    g.add_argument("--eval-top-p", type=float, default=None, help="eval nucleus mass (default: rollout's)")
    g.add_argument("--eval-top-k", type=int, default=None, help="eval top-k (default: rollout's)")
    g.add_argument("--eval-max-response-len", type=int, default=None, help="eval max new tokens (default: rollout's)")
    g.add_argument("--eval-max-prompts", type=int, default=None, help="evaluate the first N prompts of each dataset")
    g.add_argument(
        "--eval-interval", type=int, default=None,
        help="evaluate every this many rollout steps, and after the last one",
    )  # fmt: skip
    g.add_argument("--skip-eval-before-train", action="store_true", help="no evaluation at step 0")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args, parser)
    return args


def set_batch_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """rollout_batch_size x n_samples_per_prompt = global_batch_size x num_steps_per_rollout, as in slime; fills in
    whichever of the last two is missing and checks the split across ranks and micro-batches."""
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    per_rollout = f"--rollout-batch-size {args.rollout_batch_size} x --n-samples-per-prompt {args.n_samples_per_prompt}"
    if args.global_batch_size is None:
        steps = args.num_steps_per_rollout or 1
        if samples % steps:
            parser.error(f"{per_rollout} = {samples} samples do not split into --num-steps-per-rollout {steps} steps")
        args.global_batch_size, args.num_steps_per_rollout = samples // steps, steps
    elif args.num_steps_per_rollout is None:
        if samples % args.global_batch_size:
            parser.error(f"{per_rollout} = {samples} samples is not a multiple of --global-batch-size "
                         f"{args.global_batch_size}")  # fmt: skip
        args.num_steps_per_rollout = samples // args.global_batch_size
    elif args.global_batch_size * args.num_steps_per_rollout != samples:
        parser.error(f"{per_rollout} = {samples} samples, but --global-batch-size {args.global_batch_size} x "
                     f"--num-steps-per-rollout {args.num_steps_per_rollout} = "
                     f"{args.global_batch_size * args.num_steps_per_rollout}")  # fmt: skip
    for flag in ("actor_num_nodes", "actor_num_gpus_per_node", "micro_batch_size", "global_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    args.world_size = world
    if args.global_batch_size % world:
        parser.error(f"--global-batch-size {args.global_batch_size} does not split evenly over {world} training "
                     f"ranks (--actor-num-nodes x --actor-num-gpus-per-node)")  # fmt: skip
    per_rank = args.global_batch_size // world
    for flag in ("max_tokens_per_gpu", "log_probs_max_tokens_per_gpu"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.use_dynamic_batch_size:
        if not args.max_tokens_per_gpu:
            parser.error("--use-dynamic-batch-size needs --max-tokens-per-gpu")
    elif args.max_tokens_per_gpu:  # slime scripts pass it either way; say what it does here
        logging.getLogger(__name__).warning("--max-tokens-per-gpu has no effect without --use-dynamic-batch-size")
    elif per_rank % args.micro_batch_size:
        parser.error(f"--global-batch-size {args.global_batch_size} over {world} rank(s) gives {per_rank} samples "
                     f"per rank, not a multiple of --micro-batch-size {args.micro_batch_size}")  # fmt: skip


def batch_plan(args: argparse.Namespace) -> str:
    """The plan printed at start: prompts -> samples -> optimizer steps -> samples per rank -> micro-batches."""
    samples, world = args.rollout_batch_size * args.n_samples_per_prompt, args.world_size
    per_rank = args.global_batch_size // world
    split = "token-balanced (--balance-data)" if args.balance_data else "round-robin"
    if args.use_dynamic_batch_size:
        micro = f"packed to <= {args.max_tokens_per_gpu} tokens each (a longer sample is a micro-batch of its own)"
    else:
        micro = f"{per_rank // args.micro_batch_size} of {args.micro_batch_size} sample(s) each, packed without padding"
    no_grad = args.log_probs_max_tokens_per_gpu or (args.max_tokens_per_gpu if args.use_dynamic_batch_size else None)
    lines = [
        "batch plan:",
        f"  rollout      {args.rollout_batch_size} prompts x {args.n_samples_per_prompt} samples = {samples} samples, "
        f"responses <= {args.rollout_max_response_len} tokens",
        f"  training     {args.num_steps_per_rollout} optimizer step(s) of {args.global_batch_size} samples, "
        f"{per_rank} per rank on {world} rank(s), {split}",
        f"  micro-batch  {micro}",
        "  log-probs    " + (f"packed to <= {no_grad} tokens per pass" if no_grad else "as the micro-batches"),
        f"  run          {args.num_rollout} rollout(s) = {args.num_rollout * args.num_steps_per_rollout} optimizer "
        f"steps, {args.num_rollout * samples} samples",
    ]
    return "\n".join(lines)


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse inconsistent settings with one sentence naming the flags."""
    default_rollout = args.rollout_function_path == "slime.rollout.sglang_rollout.generate_rollout"
    if not args.rollout_global_dataset and default_rollout:
        parser.error("--disable-rollout-global-dataset needs a --rollout-function-path that brings its own prompts")
    if args.rollout_global_dataset and not args.prompt_data:
        parser.error("--prompt-data is required (or --disable-rollout-global-dataset with a custom rollout function)")
    for flag in ("rollout_batch_size", "n_samples_per_prompt", "num_rollout", "rollout_num_engines"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("rollout_num_gpus", "sglang_max_running_requests"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.colocate and args.rollout_num_gpus:
        parser.error("--colocate puts engines on the training GPUs; drop --rollout-num-gpus (or --colocate)")
    if args.colocate:  # as in slime: colocated engines and trainer take turns on the GPU
        args.offload_train = args.offload_rollout = True
    args.rollout_device, args.engines_share_trainer_gpus = "cpu", False  # until slime.ray.placement decides
    if not args.rm_type and not args.custom_rm_path:
        parser.error("set --rm-type (e.g. math) or --custom-rm-path so samples get rewards")
    validate_reward(args, parser)
    validate_checkpoints(args, parser)
    validate_rollout_control(args, parser)
    validate_eval(args, parser)
    validate_algorithm(args, parser)
    set_batch_plan(args, parser)
    if args.rollout_engine_threads == 0:
        args.rollout_engine_threads = max(1, (os.cpu_count() or 1) // args.rollout_num_engines)
    check_sampling(parser, "rollout sampling flags", args.rollout_temperature, args.rollout_top_p,
                   args.rollout_top_k, args.rollout_max_response_len)  # fmt: skip


def validate_checkpoints(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.save_interval is not None and (args.save_interval < 1 or not args.save):
        parser.error("--save-interval needs --save and must be at least 1")
    if args.save_hf:
        if not args.save:
            parser.error("--save-hf exports at checkpoints: set --save too")
        try:
            args.save_hf.format(rollout_id=0)
        except (KeyError, IndexError, ValueError) as exc:
            parser.error(f"--save-hf {args.save_hf!r}: the only placeholder allowed is {{rollout_id}} ({exc})")
    if args.max_nan_steps < 0:
        parser.error("--max-nan-steps must be >= 0")
    for flag in ("rollout_health_check_interval", "rollout_health_check_timeout"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0 seconds")


def check_sampling(parser: argparse.ArgumentParser, where: str, temperature, top_p, top_k, max_new_tokens) -> None:
    """The router drops keys it does not know, so sampling values are checked here rather than trusted to a 400."""
    from slime.engine.sampling import SamplingParams, SamplingParamsError

    raw = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens}
    try:
        SamplingParams.from_dict(raw)
    except (SamplingParamsError, TypeError) as exc:
        parser.error(f"{where}: {exc}")


def validate_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Eval datasets are read from the flags and the YAML once, here, into `args.eval_datasets`, so a bad entry
    fails before anything starts."""
    from slime.utils.eval_config import EvalConfigError, eval_dataset_configs

    if args.eval_prompt_data is not None and (len(args.eval_prompt_data) == 0 or len(args.eval_prompt_data) % 2):
        parser.error("--eval-prompt-data takes pairs: NAME PATH [NAME PATH …]")
    try:
        configs = eval_dataset_configs(args)
    except EvalConfigError as exc:
        parser.error(str(exc))
    if args.eval_interval is not None and (args.eval_interval < 1 or not configs):
        parser.error("--eval-interval needs a positive value and eval datasets (--eval-prompt-data or --eval-config)")
    for c in configs:
        where = f"eval dataset {c.name!r}"
        if c.n_samples_per_eval_prompt < 1 or (c.max_prompts is not None and c.max_prompts < 1):
            parser.error(f"{where}: n_samples_per_eval_prompt and max_prompts must be at least 1")
        check_sampling(parser, where, c.temperature, c.top_p, c.top_k, c.max_response_len)
    args.eval_datasets = configs


HOOK_FLAGS = (
    "rollout_function_path", "custom_generate_function_path", "data_source_path", "dynamic_sampling_filter_path",
    "buffer_filter_path", "custom_rm_path", "custom_reward_post_process_path", "eval_function_path",
    "custom_loss_function_path", "custom_pg_loss_reducer_function_path", "custom_tis_function_path",
)  # fmt: skip


def validate_rollout_control(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Dynamic sampling and partial rollout settings, and every hook path imported once so a typo fails here."""
    from slime.utils.misc import load_function

    for flag in ("over_sampling_batch_size", "dynamic_sampling_max_prompts"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.dynamic_sampling_max_prompts is not None and args.dynamic_sampling_max_prompts < args.rollout_batch_size:
        parser.error(f"--dynamic-sampling-max-prompts {args.dynamic_sampling_max_prompts} is below "
                     f"--rollout-batch-size {args.rollout_batch_size}")  # fmt: skip
    if args.mask_offpolicy_in_partial_rollout and not args.partial_rollout:
        parser.error("--mask-offpolicy-in-partial-rollout needs --partial-rollout")
    for flag in HOOK_FLAGS:
        path = getattr(args, flag, None)
        if path:
            try:
                load_function(path, f"--{flag.replace('_', '-')}")
            except (ImportError, ValueError, TypeError) as exc:
                parser.error(str(exc))


def validate_reward(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A reward type that would fail on every sample is refused before anything starts."""
    if args.rm_type == "remote_rm" and not args.rm_url:
        parser.error("--rm-type remote_rm needs --rm-url")
    if args.rm_type and args.rm_type != "remote_rm":
        from slime.rollout.rm_hub import builtin_rm

        try:
            builtin_rm(args.rm_type)
        except ValueError as exc:
            parser.error(f"--rm-type: {exc}")
    if args.rm_timeout <= 0 or args.rm_max_retries < 0:
        parser.error(f"--rm-timeout must be positive and --rm-max-retries non-negative, got {args.rm_timeout} and "
                     f"{args.rm_max_retries}")  # fmt: skip
    if args.group_rm and not args.custom_rm_path:
        logging.getLogger(__name__).info("--group-rm without --custom-rm-path: built-in rewards grade per sample")


def validate_algorithm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Algorithm flags: known names, ranges, and the combinations that cannot mean anything."""
    from slime.algorithms.advantages import ADVANTAGE_ESTIMATORS

    log = logging.getLogger(__name__)
    if args.advantage_estimator not in ADVANTAGE_ESTIMATORS:
        parser.error(
            f"--advantage-estimator {args.advantage_estimator!r}: choose one of {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    if args.eps_clip_high is None:
        args.eps_clip_high = args.eps_clip
    if args.eps_clip_c is not None and args.eps_clip_c <= 1.0:
        parser.error(f"--eps-clip-c must be greater than 1 (dual clip), got {args.eps_clip_c}")
    if args.use_kl_loss and args.kl_coef:
        parser.error(
            "--use-kl-loss and --kl-coef both penalise the KL to the reference (as a loss term and as a reward "
            "penalty): choose one"
        )
    if args.use_kl_loss and args.kl_loss_coef == 0:
        log.warning("--use-kl-loss with --kl-loss-coef 0: the KL is reported, not optimised")
    if not 0 < args.gamma <= 1 or not 0 <= args.lambd <= 1:
        parser.error(f"--gamma must be in (0, 1] and --lambd in [0, 1], got {args.gamma} and {args.lambd}")
    if args.advantage_estimator.startswith("reinforce_plus_plus") and not args.normalize_advantages:
        args.normalize_advantages = True  # the estimator is defined with batch whitening; raw returns are unscaled
        log.info("--advantage-estimator %s implies --normalize-advantages", args.advantage_estimator)
    if args.critic_lr is None:
        args.critic_lr = args.lr
    if (args.loss_type == "custom_loss") != bool(args.custom_loss_function_path):
        parser.error("--loss-type custom_loss and --custom-loss-function-path go together")
    if (args.use_tis or args.use_mis or args.custom_tis_function_path) and args.use_rollout_logprobs:
        parser.error(
            "--use-tis/--use-mis/--custom-tis-function-path correct pi_old (the trainer's log-probs) towards "
            "pi_rollout; with --use-rollout-logprobs the two are the same: drop one"
        )
    if args.use_tis and not 0 <= args.tis_clip_low < args.tis_clip:
        parser.error(f"--tis-clip-low {args.tis_clip_low} must be >= 0 and below --tis-clip {args.tis_clip}")
    if args.use_mis and not 0 < args.mis_lower_bound < args.mis_upper_bound:
        parser.error(f"--mis-lower-bound {args.mis_lower_bound} must be > 0 and below --mis-upper-bound "
                     f"{args.mis_upper_bound}")  # fmt: skip
    distill = args.use_opd or args.advantage_estimator == "on_policy_distillation"
    if args.opd_type is None and args.opd_teacher_load:
        args.opd_type = "model"
    if distill and args.opd_type is None:
        parser.error(
            f"{'--use-opd' if args.use_opd else '--advantage-estimator on_policy_distillation'} needs a teacher: "
            "--opd-teacher-load PATH (run in the trainer) or --opd-type sglang (Sample.teacher_log_probs)"
        )
    if args.opd_type in ("model", "megatron") and not args.opd_teacher_load:
        parser.error(f"--opd-type {args.opd_type} needs --opd-teacher-load")
    if args.opd_type == "sglang" and args.opd_teacher_load:
        parser.error("--opd-type sglang takes teacher log-probs from the samples: drop --opd-teacher-load")
    if args.opd_teacher_load and not distill:
        parser.error("--opd-teacher-load without --use-opd or --advantage-estimator on_policy_distillation")
