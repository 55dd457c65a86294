"""Model, cluster, engine and weight-sync flags, and where everything runs (placement).

Placement is settled once, after Ray is up (it needs the cluster's GPU count), into `rollout_device`,
`rollout_num_engines`, `engines_share_trainer_gpus` and `update_weight_mode`; the engine options that depend on
it (dtype, threads, batch rows, memory fraction) are settled right after. Engines are child processes of the
rollout manager, so they run on its node; GPU ids reach them as CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from slime.config.checks import require_at_least_one
from slime.engine.options import ENGINE_OPTIONS, add_train_arguments, prefill_sizes


class PlacementError(ValueError):
    """The flags ask for a layout the cluster cannot hold; the message names the flags."""


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and cluster")
    g.add_argument("--hf-checkpoint", required=True, help="Hugging Face folder, or the built-in SmolLM2-135M-Instruct")
    g.add_argument(
        "--rollout-num-engines",
        type=int,
        default=1,
        help="engine servers to start behind the router on CPU (on GPUs: one per GPU, see --rollout-num-gpus)",
    )
    g.add_argument(
        "--rollout-num-gpus",
        type=int,
        default=None,
        help="GPUs for engines of their own, beside the training GPUs (one engine each; weight sync by NCCL); "
        "unset: engines share the training GPUs",
    )
    g.add_argument(
        "--rollout-num-gpus-per-engine",
        type=int,
        default=1,
        help="GPUs per engine, its tensor-parallel size (the embedded engine: 1; vllm and sglang: any, with "
        "--rollout-num-gpus a multiple of it)",
    )
    g.add_argument(
        "--colocate",
        action="store_true",
        help="engines on the training GPUs, taking turns: engines release weights and KV cache while the trainer "
        "trains, the trainer moves to CPU while engines generate (implies --offload-train and --offload-rollout)",
    )
    g.add_argument(
        "--rollout-external-engine-addrs",
        nargs="+",
        default=None,
        help="HOST:PORT of engine servers started elsewhere (slime-serve, or servers speaking the same protocol): "
        "the run uses them instead of starting engines, registers them with the router and syncs weights to them",
    )
    g.add_argument(
        "--rollout-backend",
        choices=["embedded", "vllm", "sglang"],
        default="embedded",
        help="the engine servers: embedded (this project's engine); vllm (vLLM's server behind an SGLang-protocol "
        "front, slime.engine.vllm_adapter; vLLM must be importable by this interpreter or by $SLIME_VLLM_PYTHON; "
        "weights sync from disk); sglang (SGLang's own server, python -m sglang.launch_server, or "
        "$SLIME_SGLANG_PYTHON); both take --rollout-num-gpus-per-engine GPUs per engine as tensor parallelism "
        "(docs/backends.md)",
    )
    g.add_argument(
        "--sglang-server-concurrency",
        type=int,
        default=None,
        help="in-flight requests per engine, at most (default: twice the engine's running rows, "
        "--sglang-max-running-requests, so a row that frees is refilled from the engine's queue at once instead of "
        "after a round trip through the rollout)",
    )
    g.add_argument("--router-policy", default="cache_aware", help="sglang-router policy (cache_aware, round_robin, …)")
    g.add_argument(
        "--sglang-router-ip",
        default=None,
        help="address of a running sglang-router to use (with --sglang-router-port); unset: the run starts its own "
        "on 127.0.0.1",
    )
    g.add_argument(
        "--sglang-router-port", type=int, default=None, help="port of the router (unset: a free port, chosen at start)"
    )
    g.add_argument("--seed", type=int, default=1234, help="seed of engines' sampling")
    g.add_argument("--output-dir", default="outputs/run", help="logs, metrics and server logs go here")

    add_train_arguments(p.add_argument_group("rollout engines (each engine server's options; slime-serve --help)"))

    g = p.add_argument_group("weight sync")
    g.add_argument(
        "--update-weight-mode",
        default=None,
        choices=["tensor", "distributed", "disk"],
        help="how new weights reach engines: shared memory / CUDA IPC, a gloo / NCCL broadcast, or files (default: "
        "tensor, or distributed when engines have GPUs of their own)",
    )
    g.add_argument(
        "--update-weight-buffer-size", type=int, default=512 * 1024**2, help="bytes of weights sent per bucket"
    )
    g.add_argument("--update-weight-timeout", type=float, default=600.0, help="seconds any weight-sync step may take")
    g.add_argument(
        "--weight-sync-pause-mode",
        default="abort",
        choices=["abort", "in_place"],
        help="what engines do with running requests during a weight sync: abort (they end with finish reason abort "
        "and go back to the data source, resumed from their partial response under --partial-rollout) or in_place "
        "(they stop between decode steps and go on with the new weights, nothing recomputed; a response then "
        "spans two versions, both recorded in the sample's weight_versions). Only matters when requests run "
        "across a sync: with the fully-asynchronous rollout function",
    )


def validate_cluster(args: Any, parser: argparse.ArgumentParser) -> None:
    require_at_least_one(
        args,
        parser,
        "rollout_num_engines",
        "rollout_num_gpus",
        "sglang_max_running_requests",
        "sglang_server_concurrency",
        "sglang_chunked_prefill_size",
        "sglang_max_prefill_tokens",
        "sglang_page_size",
    )
    fraction = args.sglang_mem_fraction_static
    if fraction is not None and not 0 < fraction <= 1:
        parser.error(f"--sglang-mem-fraction-static must be in (0, 1], got {fraction}")
    if args.colocate and args.rollout_num_gpus:
        trainer_gpus = args.actor_num_nodes * args.actor_num_gpus_per_node
        if args.rollout_num_gpus != trainer_gpus:  # slime's scripts pass the training GPU count here
            parser.error(
                f"--colocate puts one engine on each of the {trainer_gpus} training GPUs; --rollout-num-gpus "
                f"{args.rollout_num_gpus} asks for another count: drop it (or --colocate)"
            )
        args.rollout_num_gpus = None  # the colocated layout, as if it were not given
    if args.rollout_external_engine_addrs:
        if args.colocate or args.rollout_num_gpus:
            parser.error(
                "--rollout-external-engine-addrs uses engines started elsewhere: drop --colocate and --rollout-num-gpus"
            )
        if args.use_fault_tolerance:
            parser.error(
                "--use-fault-tolerance restarts engines; external ones (--rollout-external-engine-addrs) cannot be"
            )
        args.rollout_external_engine_addrs = [
            a.rstrip("/") if "://" in a else f"http://{a.rstrip('/')}" for a in args.rollout_external_engine_addrs
        ]
    if args.rollout_backend == "vllm":
        refused = [f for f, on in (("--colocate", args.colocate), ("--offload-rollout", args.offload_rollout)) if on]
        if refused:
            parser.error(f"--rollout-backend vllm: {refused[0]} needs engines that release memory, not wired for vLLM")
        if args.update_weight_mode not in (None, "disk"):
            parser.error(
                f"--rollout-backend vllm syncs weights from disk (vLLM's reload); --update-weight-mode "
                f"{args.update_weight_mode} is not wired for it: drop it or use disk"
            )
        args.update_weight_mode = "disk"
        if getattr(args, "lora_sync", "merged") == "adapters":
            parser.error("--rollout-backend vllm takes merged weights: drop --lora-sync adapters")
    if args.rollout_backend == "sglang" and getattr(args, "lora_sync", "merged") == "adapters":
        parser.error("--rollout-backend sglang: --lora-sync adapters is not wired to SGLang's LoRA API; drop it")
    if args.sglang_router_ip and args.sglang_router_port is None:
        parser.error("--sglang-router-ip names a running router: give its --sglang-router-port too")
    if args.colocate and not args.debug_train_only:  # as in slime: colocated engines and trainer take turns
        args.offload_train = args.offload_rollout = True
    if args.debug_train_only:  # no engines to make room for
        args.offload_train = args.offload_rollout = False


def place(args: Any, cluster_gpus: int) -> None:
    """Decide the engines' device, count and weight-sync mode for a cluster with `cluster_gpus` GPUs.

    - no GPU: engines on CPU (--rollout-num-engines of them); --colocate still releases engine memory during training.
    - --colocate: one engine per training GPU, on that GPU; engines release weights and KV cache while the trainer
      trains and the trainer moves to CPU while engines generate (--offload-rollout and --offload-train).
    - --rollout-num-gpus N: N engines on N GPUs of their own, next to the training GPUs (weight sync by NCCL).
    - neither: one engine per training GPU, sharing it with the trainer as separate processes; nothing is released
      unless --offload-rollout / --offload-train ask for it.
    """
    args.cluster_gpus = cluster_gpus
    trainer_gpus = 0 if args.debug_rollout_only else args.world_size
    if args.rollout_external_engine_addrs:  # engines elsewhere: none to place, weights go over the network
        args.rollout_num_engines = len(args.rollout_external_engine_addrs)
        args.rollout_device, args.engines_share_trainer_gpus = ("cuda" if cluster_gpus else "cpu"), False
        args.update_weight_mode = args.update_weight_mode or ("distributed" if cluster_gpus else "tensor")
        return
    if cluster_gpus == 0:
        args.rollout_device, args.engines_share_trainer_gpus = "cpu", False
        args.update_weight_mode = args.update_weight_mode or "tensor"
        return
    per_engine = args.rollout_num_gpus_per_engine
    if per_engine != 1 and args.rollout_backend == "embedded":
        raise PlacementError(
            f"--rollout-num-gpus-per-engine {per_engine}: the embedded engine runs on one GPU (no tensor "
            "parallelism); use 1, or --rollout-backend vllm / sglang for tensor-parallel engines"
        )
    if per_engine != 1 and (args.colocate or not args.rollout_num_gpus):
        raise PlacementError(
            f"--rollout-num-gpus-per-engine {per_engine}: engines sharing the training GPUs take one each; give "
            "tensor-parallel engines GPUs of their own with --rollout-num-gpus"
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
        return
    need = trainer_gpus + args.rollout_num_gpus
    if need > cluster_gpus:
        raise PlacementError(
            f"--rollout-num-gpus {args.rollout_num_gpus} + {trainer_gpus} training GPU(s) = {need} GPUs, but the "
            f"cluster has {cluster_gpus}: use fewer, or --colocate to share the training GPUs"
        )
    if args.rollout_num_gpus % per_engine:
        raise PlacementError(
            f"--rollout-num-gpus {args.rollout_num_gpus} is not a multiple of --rollout-num-gpus-per-engine "
            f"{per_engine}"
        )
    args.rollout_num_engines, args.engines_share_trainer_gpus = args.rollout_num_gpus // per_engine, False
    args.update_weight_mode = args.update_weight_mode or "distributed"
    if args.update_weight_mode == "tensor":
        raise PlacementError(
            "--update-weight-mode tensor passes CUDA IPC handles, which an engine on another GPU cannot open; with "
            "--rollout-num-gpus use distributed (NCCL) or disk"
        )


def settle_engine_options(args: Any) -> None:
    """The engine options left unset, from the placement: every engine of the run is launched with these."""
    on_gpu = args.rollout_device == "cuda"
    args.rollout_engine_dtype = args.rollout_engine_dtype or ("bfloat16" if on_gpu else "float32")
    cores = os.cpu_count() or 1
    # --async on CPU: engines and trainer compute at the same time, so each side gets half the cores (two sides with
    # all of them oversubscribe the cores and the threads spin against each other)
    engine_cores = max(1, cores // 2) if args.async_train and not on_gpu else cores
    if not args.rollout_engine_threads:  # after placement: it decides how many engines share the cores
        args.rollout_engine_threads = max(1, engine_cores // args.rollout_num_engines)
    if args.async_train and not on_gpu and not args.train_threads:
        args.train_threads = max(1, (cores - engine_cores) // max(1, args.world_size))
    if args.sglang_enable_deterministic_inference:  # one request at a time: results do not depend on batching
        args.sglang_max_running_requests = 1
        # nor on which earlier request computed a shared prefix (a prefill of another length rounds differently)
        args.sglang_disable_radix_cache = True
    elif args.sglang_max_running_requests is None:
        args.sglang_max_running_requests = 512 if on_gpu else 256
    if args.sglang_server_concurrency is None:
        args.sglang_server_concurrency = 2 * args.sglang_max_running_requests
    if args.sglang_mem_fraction_static is None:
        args.sglang_mem_fraction_static = 0.6 if args.colocate else 0.35 if args.engines_share_trainer_gpus else 0.85
    args.sglang_chunked_prefill_size, args.sglang_max_prefill_tokens = prefill_sizes(
        on_gpu, args.sglang_chunked_prefill_size, args.sglang_max_prefill_tokens
    )
    for option in ENGINE_OPTIONS:  # the rest: the server's own default, from the one table
        if option.train_flag and getattr(args, option.train_dest) is None:
            setattr(args, option.train_dest, option.default)


def settle_router(args: Any) -> None:
    """Where the router listens: a running one the flags name, or one the run starts on a port chosen now, so every
    process (and every slime-style hook reading args.sglang_router_ip / _port) knows it from the start. A port chosen
    here stays reserved by this process until the run ends (`release_port`), so nothing else takes it meanwhile."""
    import weakref

    from slime.utils.http_utils import release_port, reserve_port

    args.launch_router = args.sglang_router_ip is None
    args.sglang_router_ip = args.sglang_router_ip or "127.0.0.1"
    if not args.sglang_router_port:
        args.sglang_router_port = reserve_port(args.sglang_router_ip)
        # settled flags that never run (a notebook, a tool, a test) give the port back when they are dropped
        weakref.finalize(args, release_port, args.sglang_router_ip, args.sglang_router_port)


def placement_line(args: Any) -> str:
    """The placement, as the run prints it at start."""
    mode, n = args.update_weight_mode, args.rollout_num_engines
    if args.rollout_external_engine_addrs:
        return f"engines: {n} external ({', '.join(args.rollout_external_engine_addrs)}); weight sync by {mode}"
    if args.rollout_device == "cpu":
        how = ", memory released during training" if args.offload_rollout else ""  # --colocate implies it
        return f"engines: {n} on CPU{how}; weight sync by {mode}"
    if args.engines_share_trainer_gpus:
        if args.colocate:
            how = "colocated (weights and KV cache released during training)"
        else:
            how = "shared as separate processes" + (", memory released in training" if args.offload_rollout else "")
        return f"engines: {n} on the {n} training GPU(s), {how}; weight sync by {mode}"
    trainer_gpus = 0 if args.debug_rollout_only else args.world_size
    return f"engines: {n} on GPUs of their own, beside {trainer_gpus} training GPU(s); weight sync by {mode}"
