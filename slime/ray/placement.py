"""Where engines run: on CPU, on the training GPUs (colocated or merely shared), or on GPUs of their own.

`place_engines` settles it once, after Ray is up, and writes the outcome into `args` (every actor receives the same
args): `rollout_device`, `rollout_num_engines`, `engines_share_trainer_gpus`, and the weight-sync mode when
--update-weight-mode was left to choose. Engines are child processes of the rollout manager, so they run on its
node; GPU ids reach them as CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

from typing import Any


class PlacementError(ValueError):
    """The flags ask for a layout the cluster cannot hold; the message names the flags."""


def place_engines(args: Any, cluster_gpus: int) -> str:
    """Decide the engines' device, count and GPUs for a cluster with `cluster_gpus` GPUs; returns the plan's line.

    - no GPU: engines on CPU (--rollout-num-engines of them); --colocate still releases engine memory during training.
    - --colocate: one engine per training GPU, on that GPU; engines release weights and KV cache while the trainer
      trains and the trainer moves to CPU while engines generate (--offload-rollout and --offload-train).
    - --rollout-num-gpus N: N engines on N GPUs of their own, next to the training GPUs (weight sync by NCCL).
    - neither: one engine per training GPU, sharing it with the trainer as separate processes; nothing is released
      unless --offload-rollout / --offload-train ask for it.
    """
    trainer_gpus = 0 if args.debug_rollout_only else args.world_size
    if cluster_gpus == 0:
        args.rollout_device, args.engines_share_trainer_gpus = "cpu", False
        args.update_weight_mode = args.update_weight_mode or "tensor"
        how = ", memory released during training" if args.offload_rollout else ""  # --colocate implies it
        return f"engines: {args.rollout_num_engines} on CPU{how}; weight sync by {args.update_weight_mode}"
    if args.rollout_num_gpus_per_engine != 1:
        raise PlacementError(
            f"--rollout-num-gpus-per-engine {args.rollout_num_gpus_per_engine}: the embedded engine runs on one GPU "
            "(no tensor parallelism); use 1"
        )
    args.rollout_device = "cuda"
    if args.colocate or not args.rollout_num_gpus:
        if trainer_gpus == 0:
            raise PlacementError("--debug-rollout-only on GPUs needs --rollout-num-gpus: there is no trainer to share")
        if args.actor_num_nodes > 1:
            raise PlacementError(
                "engines run on the rollout manager's node, so sharing the training GPUs needs --actor-num-nodes 1; "
                "give engines their own GPUs with --rollout-num-gpus"
            )
        args.rollout_num_engines, args.engines_share_trainer_gpus = trainer_gpus, True
        args.update_weight_mode = args.update_weight_mode or "tensor"
        if args.colocate:
            how = "colocated (weights and KV cache released during training)"
        else:
            how = "shared as separate processes" + (", memory released in training" if args.offload_rollout else "")
        return (f"engines: {trainer_gpus} on the {trainer_gpus} training GPU(s), {how}; weight sync by "
                f"{args.update_weight_mode}")  # fmt: skip
    need = trainer_gpus + args.rollout_num_gpus
    if need > cluster_gpus:
        raise PlacementError(
            f"--rollout-num-gpus {args.rollout_num_gpus} + {trainer_gpus} training GPU(s) = {need} GPUs, but the "
            f"cluster has {cluster_gpus}: use fewer, or --colocate to share the training GPUs"
        )
    args.rollout_num_engines, args.engines_share_trainer_gpus = args.rollout_num_gpus, False
    args.update_weight_mode = args.update_weight_mode or "distributed"
    if args.update_weight_mode == "tensor":
        raise PlacementError(
            "--update-weight-mode tensor passes CUDA IPC handles, which an engine on another GPU cannot open; with "
            "--rollout-num-gpus use distributed (NCCL) or disk"
        )
    return (f"engines: {args.rollout_num_gpus} on GPUs of their own, beside {trainer_gpus} training GPU(s); weight "
            f"sync by {args.update_weight_mode}")  # fmt: skip


def engine_dtype(args: Any) -> str:
    """--rollout-engine-dtype, or its default for where engines run: bfloat16 on GPU, float32 on CPU."""
    return args.rollout_engine_dtype or ("bfloat16" if args.rollout_device == "cuda" else "float32")
