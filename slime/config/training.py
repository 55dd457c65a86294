"""Training flags and the batch plan (prompts -> samples -> optimizer steps -> micro-batches)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from slime.config.checks import require_at_least_one


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--actor-num-nodes", type=int, default=1, help="nodes of training ranks")
    g.add_argument(
        "--actor-num-gpus-per-node",
        type=int,
        default=1,
        help="training ranks per node: one per GPU, or one process each on CPU (world size = nodes x this)",
    )
    g.add_argument("--train-threads", type=int, default=0, help="torch threads per CPU training rank (0: cores/ranks)")
    g.add_argument(
        "--ref-load",
        default=None,
        help="reference model for the KL terms: a Hugging Face folder or a --save folder (default: --hf-checkpoint)",
    )
    g.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="train LoRA adapters of this rank on the frozen policy instead of every weight (0: full fine-tuning); "
        "LoRA usually wants a learning rate ~10x the full fine-tuning one",
    )
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: scaling = alpha / rank "
                   "(default: 2 x --lora-rank)")  # fmt: skip
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (probability)")
    g.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=["all-linear"],
        help="names (last component) of the linear layers to adapt, e.g. q_proj v_proj; 'all-linear' (default): "
        "every linear layer of the decoder (attention and MLP projections), not the output layer",
    )
    g.add_argument(
        "--lora-sync",
        default="merged",
        choices=["merged", "adapters"],
        help="what a weight sync sends with --lora-rank: the merged weights (any engine serves them) or the adapters "
        "alone (megabytes; the embedded engine merges them into the weights it started with)",
    )
    g.add_argument("--lr", type=float, default=1e-6, help="peak learning rate of AdamW")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of linear/cosine decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="optimizer steps of linear warm-up from 0")
    g.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="warm-up as a fraction of the decay steps (--lr-decay-iters, default the whole run); replaces "
        "--lr-warmup-iters",
    )
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
        "--use-dynamic-batch-size",
        action="store_true",
        help="pack micro-batches by tokens (--max-tokens-per-gpu) instead of --micro-batch-size samples",
    )
    g.add_argument(
        "--max-tokens-per-gpu",
        type=int,
        default=None,
        help="tokens per packed micro-batch on one rank (with --use-dynamic-batch-size; unset: sized from the GPU's "
        "free memory at the first step, 2048 on CPU)",
    )
    g.add_argument(
        "--log-probs-max-tokens-per-gpu",
        type=int,
        default=None,
        help="tokens per packed pass when computing old/ref/teacher log-probs and values (no gradient, so it can be "
        "larger; default --max-tokens-per-gpu (twice the sized budget when that is unset), or --micro-batch-size "
        "samples)",
    )
    g.add_argument(
        "--train-compute-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="dtype of the trainer's forward and backward passes; weights, optimizer state and gradient reduction "
        "stay float32. auto: bfloat16 on GPU, float32 on CPU (bfloat16 there pays only with AMX: 2.1x on the "
        "SmolLM2 trainer, docs/benchmarks.md, at a larger trainer-vs-engine log-prob gap)",
    )
    g.add_argument(
        "--train-compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the trainer's normalisation layers, MLPs and rotary embedding into fused kernels "
        "(attention stays eager); auto: on GPU only. Qwen3-0.6B shape on one H200: 2.66 s -> 1.70 s per rollout's "
        "training (docs/benchmarks.md), for a one-time compile of 10-20 s",
    )
    g.add_argument(
        "--balance-data",
        action="store_true",
        help="split each optimizer step over ranks by token count (Karmarkar-Karp) instead of round-robin",
    )
    g.add_argument(
        "--offload-train",
        action="store_true",
        help="between training steps, keep the trainer's weights and optimizer state on CPU (GPU ranks only): frees "
        "the GPU for rollout engines sharing it; the log shows torch.cuda.memory_allocated before and after",
    )
    g.add_argument(
        "--offload-rollout",
        action="store_true",
        help="engines release their weights and KV cache while the trainer trains and take them back before the "
        "weight sync; each engine's log shows torch.cuda.memory_allocated before and after",
    )
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0, help="timeout of training collectives")
    g.add_argument(
        "--train-timeout",
        type=float,
        default=3600.0,
        help="seconds to wait for the training ranks to load, train on one rollout, or sync weights",
    )


def settle_lora(args: Any, parser: argparse.ArgumentParser) -> None:
    """--lora-*: ranges, the alpha default, and what adapters cannot do here."""
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if not args.lora_rank:
        if args.lora_sync != "merged" or args.save_hf_merged:
            parser.error("--lora-sync and --save-hf-merged apply to LoRA adapters: set --lora-rank")
        return
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    if args.lora_alpha <= 0 or not 0 <= args.lora_dropout < 1:
        parser.error(
            f"--lora-alpha must be > 0 and --lora-dropout in [0, 1), got {args.lora_alpha}, {args.lora_dropout}"
        )
    if args.ref_update_interval:
        parser.error(
            "--ref-update-interval moves the KL reference to the policy; with --lora-rank the reference is the base "
            "model under the adapters (no second copy): drop one of the two"
        )
    if args.tensor_model_parallel_size > 1:
        parser.error("--lora-rank with --tensor-model-parallel-size > 1 is not supported yet: use FSDP alone")
    if args.lora_sync == "adapters" and args.offload_rollout:
        parser.error(
            "--lora-sync adapters with --offload-rollout/--colocate: engines that release their weights get them back "
            "empty, and adapters alone cannot refill them: use --lora-sync merged"
        )


def settle_batch_plan(args: Any, parser: argparse.ArgumentParser) -> None:
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
            parser.error(
                f"{per_rollout} = {samples} samples is not a multiple of --global-batch-size {args.global_batch_size}"
            )
        args.num_steps_per_rollout = samples // args.global_batch_size
    elif args.global_batch_size * args.num_steps_per_rollout != samples:
        parser.error(
            f"{per_rollout} = {samples} samples, but --global-batch-size {args.global_batch_size} x "
            f"--num-steps-per-rollout {args.num_steps_per_rollout} = "
            f"{args.global_batch_size * args.num_steps_per_rollout}"
        )
    require_at_least_one(
        args, parser, "actor_num_nodes", "actor_num_gpus_per_node", "micro_batch_size", "global_batch_size"
    )
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    args.world_size = world
    tp = args.tensor_model_parallel_size
    if world % tp:
        parser.error(f"--tensor-model-parallel-size {tp} does not divide the {world} training ranks")
    args.data_parallel_size = dp = world // tp  # a tensor-parallel group of tp ranks takes one data share
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            parser.error("--lr-warmup-fraction and --lr-warmup-iters both set the warm-up: choose one")
        if not 0 <= args.lr_warmup_fraction <= 1:
            parser.error(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
        decay = args.lr_decay_iters or args.num_rollout * args.num_steps_per_rollout
        args.lr_warmup_iters = int(args.lr_warmup_fraction * decay)
    if args.global_batch_size % dp:
        parser.error(
            f"--global-batch-size {args.global_batch_size} does not split evenly over {dp} data-parallel "
            f"ranks (--actor-num-nodes x --actor-num-gpus-per-node / --tensor-model-parallel-size)"
        )
    per_rank = args.global_batch_size // dp
    require_at_least_one(args, parser, "max_tokens_per_gpu", "log_probs_max_tokens_per_gpu")
    # with --use-dynamic-batch-size and no --max-tokens-per-gpu each rank sizes its budget (slime.trainer.budget)
    if args.use_dynamic_batch_size:
        return
    if args.max_tokens_per_gpu:  # slime scripts pass it either way; say what it does here
        logging.getLogger(__name__).warning("--max-tokens-per-gpu has no effect without --use-dynamic-batch-size")
    elif per_rank % args.micro_batch_size:
        parser.error(
            f"--global-batch-size {args.global_batch_size} over {dp} data-parallel rank(s) gives {per_rank} samples "
            f"per rank, not a multiple of --micro-batch-size {args.micro_batch_size}"
        )


def batch_plan(args: Any) -> str:
    """The plan printed at start: prompts -> samples -> optimizer steps -> samples per rank -> micro-batches."""
    samples, world = args.rollout_batch_size * args.n_samples_per_prompt, args.data_parallel_size
    per_rank = args.global_batch_size // world
    split = "token-balanced (--balance-data)" if args.balance_data else "round-robin"
    budget = args.max_tokens_per_gpu or "a budget sized at the first step"
    if args.use_dynamic_batch_size:
        micro = f"packed to <= {budget} tokens each (a longer sample is a micro-batch of its own)"
    else:
        micro = f"{per_rank // args.micro_batch_size} of {args.micro_batch_size} sample(s) each, packed without padding"
    no_grad = args.log_probs_max_tokens_per_gpu or (budget if args.use_dynamic_batch_size else None)
    lines = [
        "batch plan:",
        f"  rollout      {args.rollout_batch_size} prompts x {args.n_samples_per_prompt} samples = {samples} samples, "
        f"responses <= {args.rollout_max_response_len} tokens",
        f"  training     {args.num_steps_per_rollout} optimizer step(s) of {args.global_batch_size} samples, "
        f"{per_rank} per rank on {world} data-parallel rank(s)"
        + (f" x tensor-parallel {args.tensor_model_parallel_size}" if args.tensor_model_parallel_size > 1 else "")
        + f", {split}",
        f"  micro-batch  {micro}",
        "  log-probs    " + (f"packed to <= {no_grad} tokens per pass" if no_grad else "as the micro-batches"),
        f"  run          {args.num_rollout} rollout(s) = {args.num_rollout * args.num_steps_per_rollout} optimizer "
        f"steps, {args.num_rollout * samples} samples",
    ]
    return "\n".join(lines)
