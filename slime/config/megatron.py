"""The flags slime's run scripts pass for its Megatron backend and SGLang servers, so those scripts start unchanged.

Each flag is one of
- honoured: recompute -> activation checkpointing of the decoder layers; `--optimizer adam` -> AdamW; dropout
  values -> the model config's dropout; `--no-offload-*` undo what `--colocate` implies;
- inert: it tunes something this trainer or the embedded engine does not have (Megatron kernels and fusions,
  precision knobs FSDP2 already follows, SGLang server features); accepted, and one warning at start lists them;
- checked: the model-architecture flags (MODEL_ARGS) describe what `--hf-checkpoint`'s config.json already says;
  they are compared with it and a disagreement is named in the warning (the config is what the model runs);
- refused: a value that cannot be honoured here (pipeline, context or expert parallelism > 1, tensor parallelism > 1
  for now) stops the run with a sentence naming the flag.
docs/compatibility.md has the whole table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from slime.config.checks import flag, require_at_least_one

# value flags of Megatron's model description, with the Hugging Face config key they must agree with (None: no key)
ARCHITECTURE_VALUES: dict[str, str | None] = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim",
    "rotary_base": "rope_theta",
    "norm_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "normalization": None,
    "position_embedding_type": None,
    "rotary_percent": None,
    "rotary_scaling_factor": None,
    "make_vocab_size_divisible_by": None,
    "seq_length": None,
    "num_experts": "num_experts",
    "moe_router_topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_shared_expert_intermediate_size": "shared_expert_intermediate_size",
    "moe_token_dispatcher_type": None,
    "moe_router_score_function": None,
    "moe_router_dtype": None,
    "moe_layer_freq": None,
    "moe_aux_loss_coeff": None,
    "moe_router_load_balancing_type": None,
    "moe_router_bias_update_rate": None,
    "moe_router_topk_scaling_factor": None,
    "moe_token_drop_policy": None,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "v_head_dim": None,
    "qk_head_dim": None,
    "qk_pos_emb_head_dim": None,
    "kv_lora_rank": None,
    "q_lora_rank": None,
    "mscale": None,
    "mscale_all_dim": None,
    "mtp_num_layers": None,
    "mtp_loss_scaling_factor": None,
    "decoder_first_pipeline_num_layers": None,
    "decoder_last_pipeline_num_layers": None,
}
ARCHITECTURE_SWITCHES = (
    "swiglu",
    "group_query_attention",
    "use_rotary_position_embeddings",
    "disable_bias_linear",
    "qk_layernorm",
    "untie_embeddings_and_output_weights",
    "add_qkv_bias",
    "no_position_embedding",
    "use_rope_scaling",
    "rotary_interleaved",
    "multi_latent_attention",
    "use_gated_attention",
    "attention_output_gate",
    "apply_layernorm_1p",
    "post_self_attn_layernorm",
    "post_mlp_layernorm",
    "moe_router_pre_softmax",
    "moe_router_enable_expert_bias",
    "moe_shared_expert_gate",
)
# Megatron kernels, fusions and precision or memory knobs: FSDP2 here already reduces gradients in fp32, shards the
# optimizer state, and SDPA keeps the softmax in fp32
KERNEL_SWITCHES = (
    "accumulate_allreduce_grads_in_fp32",
    "attention_softmax_in_fp32",
    "no_masked_softmax_fusion",
    "no_gradient_accumulation_fusion",
    "no_rope_fusion",
    "moe_permute_fusion",
    "moe_grouped_gemm",
    "moe_enable_deepep",
    "use_distributed_optimizer",
    "use_precision_aware_optimizer",
    "optimizer_cpu_offload",
    "overlap_cpu_optimizer_d2h_h2d",
    "no_check_for_nan_in_loss_and_grad",
    "deterministic_mode",
    "allgather_cp",
    "enable_experimental",
)
KERNEL_VALUES = ("attention_backend", "log_probs_chunk_size", "data_pad_size_multiplier", "model_name")
PARALLEL_SIZES = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
)
# SGLang server features the embedded engine does not have (a real SGLang backend would take them)
SGLANG_VALUES = (
    "sglang_dp_size",
    "sglang_ep_size",
    "sglang_moe_dense_tp_size",
    "sglang_moe_a2a_backend",
    "sglang_deepep_mode",
    "sglang_attention_backend",
    "sglang_watchdog_timeout",
    "sglang_nsa_prefill_backend",
    "sglang_nsa_decode_backend",
    "sglang_kv_cache_dtype",
    "sglang_speculative_algorithm",
    "sglang_speculative_num_steps",
    "sglang_speculative_eagle_topk",
    "sglang_speculative_num_draft_tokens",
    "sglang_speculative_draft_attention_backend",
    "sglang_mamba_scheduler_strategy",
    "sglang_disaggregation_transfer_backend",
    "sglang_disaggregation_ib_device",
    "sglang_config",
    "prefill_num_servers",
    "sglang_tool_call_parser",  # parsers of SGLang's OpenAI chat endpoint; /generate returns raw text either way
    "sglang_reasoning_parser",
)
SGLANG_SWITCHES = (
    "sglang_enable_dp_attention",
    "sglang_enable_dp_lm_head",
    "sglang_disable_overlap_schedule",
)


def add_megatron_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "slime's Megatron and SGLang flags",
        "accepted so slime's run scripts start unchanged: honoured, inert (listed in one warning) or refused "
        "(docs/compatibility.md)",
    )
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="adam: AdamW (the only one here)")
    g.add_argument(
        "--recompute-granularity",
        default=None,
        choices=["full", "selective"],
        help="full: activation checkpointing of decoder layers (recomputed in backward); selective: inert (SDPA "
        "already keeps no attention matrix)",
    )
    g.add_argument(
        "--recompute-method",
        default=None,
        choices=["uniform", "block"],
        help="with --recompute-granularity full: uniform checkpoints every layer, block only the first "
        "--recompute-num-layers",
    )
    g.add_argument("--recompute-num-layers", type=int, default=None, help="block: layers checkpointed")
    g.add_argument("--attention-dropout", type=float, default=None, help="the model config's attention dropout")
    g.add_argument("--hidden-dropout", type=float, default=None, help="the model config's hidden (residual) dropout")
    g.add_argument("--no-offload-train", action="store_true", help="keep the trainer on GPU under --colocate")
    g.add_argument("--no-offload-rollout", action="store_true", help="engines keep their memory under --colocate")
    g.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (inert at TP 1)")
    g.add_argument("--enable-mtp-training", action="store_true", help="multi-token prediction training (refused)")
    g.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="training ranks that split each layer by the model's tensor-parallel plan (transformers' tp_plan); "
        "FSDP2 shards over the world size / this many data-parallel ranks",
    )
    for dest in PARALLEL_SIZES[1:]:
        g.add_argument(flag(dest), type=int, default=1, help="Megatron parallel size; only 1 is supported here")
    for dest in ARCHITECTURE_VALUES:
        g.add_argument(flag(dest), default=None, help="Megatron model description (checked against config.json)")
    for dest in KERNEL_VALUES + SGLANG_VALUES:
        g.add_argument(flag(dest), default=None, help="inert here (docs/compatibility.md)")
    for dest in ARCHITECTURE_SWITCHES + KERNEL_SWITCHES + SGLANG_SWITCHES:
        g.add_argument(flag(dest), action="store_true", help="inert here (docs/compatibility.md)")
    g.add_argument("--spec", nargs="*", default=None, help="Megatron layer spec (inert: the model is Hugging Face's)")
    g.add_argument("--sglang-cuda-graph-bs", type=int, nargs="*", default=None, help="inert (own graph buckets)")


def settle_megatron(args: Any, parser: argparse.ArgumentParser) -> None:
    """Refuse what cannot be honoured, derive what is honoured, and warn once about the rest."""
    require_at_least_one(args, parser, *PARALLEL_SIZES)
    for dest in PARALLEL_SIZES[1:]:  # all but tensor parallelism
        if getattr(args, dest) != 1:
            parser.error(
                f"{flag(dest)} {getattr(args, dest)}: this trainer has no pipeline, context or expert parallelism; "
                "use 1"
            )
    if args.tensor_model_parallel_size > 1:
        from slime.algorithms.advantages import ADVANTAGE_ESTIMATORS

        if ADVANTAGE_ESTIMATORS[args.advantage_estimator].needs_critic:
            parser.error(
                f"--tensor-model-parallel-size {args.tensor_model_parallel_size}: the critic "
                f"(--advantage-estimator {args.advantage_estimator}) trains without tensor parallelism here; use 1"
            )
    if args.optimizer != "adam":
        parser.error(f"--optimizer {args.optimizer}: only adam (AdamW) is implemented")
    if args.enable_mtp_training:
        parser.error("--enable-mtp-training: multi-token-prediction training is not implemented")
    for dest in ("attention_dropout", "hidden_dropout"):
        value = getattr(args, dest)
        if value is not None and not 0 <= value < 1:
            parser.error(f"{flag(dest)} must be in [0, 1), got {value}")
    args.activation_checkpointing = None  # decoder layers to recompute in backward: None, "all" or a count
    if args.recompute_granularity == "full":
        if args.recompute_method == "block":
            if not args.recompute_num_layers or args.recompute_num_layers < 1:
                parser.error("--recompute-method block needs --recompute-num-layers >= 1")
            args.activation_checkpointing = args.recompute_num_layers
        else:
            args.activation_checkpointing = "all"
    if args.colocate:
        args.offload_train = args.offload_train and not args.no_offload_train
        args.offload_rollout = args.offload_rollout and not args.no_offload_rollout
    inert = [flag(d) for d in KERNEL_SWITCHES + SGLANG_SWITCHES if getattr(args, d)]
    inert += [flag(d) for d in KERNEL_VALUES + SGLANG_VALUES if getattr(args, d) is not None]
    inert += ["--spec"] * (args.spec is not None) + ["--sglang-cuda-graph-bs"] * (args.sglang_cuda_graph_bs is not None)
    if args.sequence_parallel:
        inert.append("--sequence-parallel")
    if args.recompute_granularity == "selective":
        inert.append("--recompute-granularity selective")
    architecture = [flag(d) for d in ARCHITECTURE_SWITCHES if getattr(args, d)]
    architecture += [flag(d) for d in ARCHITECTURE_VALUES if getattr(args, d) is not None]
    log = logging.getLogger("slime.config")
    if inert:
        log.warning("accepted, no effect here (docs/compatibility.md): %s", " ".join(inert))
    if architecture:
        log.warning(
            "the model's architecture comes from --hf-checkpoint's config.json; Megatron model flags accepted "
            "without effect: %s",
            " ".join(architecture),
        )


def check_tensor_parallel(args: Any, model_path: str) -> str | None:
    """Why --tensor-model-parallel-size cannot split this model (None when it can): the model needs a
    tensor-parallel plan in transformers and head counts the size divides."""
    tp = args.tensor_model_parallel_size
    if tp == 1:
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    if not getattr(config, "base_model_tp_plan", None):
        return f"{config.model_type} models have no tensor-parallel plan in transformers"
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, key, None)
        if heads is not None and heads % tp:
            return f"{key} {heads} of {model_path} is not divisible by {tp}"
    return None


def check_architecture(args: Any, model_path: str) -> list[str]:
    """The Megatron model flags that disagree with the model's config.json, as 'flag value (config key value)'."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        config = json.load(f)
    config = {**config.get("text_config", {}), **config}
    out = []
    for dest, key in ARCHITECTURE_VALUES.items():
        given = getattr(args, dest)
        if given is None or key is None or config.get(key) is None:
            continue
        try:
            same = abs(float(given) - float(config[key])) <= 1e-9 * max(1.0, abs(float(config[key])))
        except (TypeError, ValueError):
            continue
        if dest == "vocab_size" and float(given) >= float(config[key]):  # Megatron pads the vocabulary
            same = True
        if not same:
            out.append(f"{flag(dest)} {given} ({key} {config[key]})")
    return out
