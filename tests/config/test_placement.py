"""Where engines run for each cluster shape and flag set (slime.config.cluster), without starting anything."""

from __future__ import annotations

import pytest

from slime.config.arguments import parse_args
from slime.config.cluster import placement_line


def _args(*extra: str, gpus: int = 0):
    flags = ["--hf-checkpoint", "m", "--prompt-data", "builtin:arithmetic", "--rm-type", "math", *extra]
    return parse_args(flags, cluster_gpus=gpus)


def test_cpu_cluster_keeps_engines_on_cpu():
    args = _args("--rollout-num-engines", "2")
    assert "2 on CPU" in placement_line(args)
    assert (args.rollout_device, args.rollout_num_engines, args.update_weight_mode) == ("cpu", 2, "tensor")
    assert args.rollout_engine_dtype == "float32" and not args.offload_rollout
    assert args.sglang_max_running_requests == 256 and args.sglang_chunked_prefill_size == 4096
    assert args.sglang_max_prefill_tokens == 4096


def test_colocate_shares_every_training_gpu_and_implies_both_offloads():
    args = _args("--colocate", "--actor-num-gpus-per-node", "4", "--global-batch-size", "4", gpus=8)
    assert args.offload_train and args.offload_rollout
    assert "4 on the 4 training GPU(s), colocated" in placement_line(args)
    assert (args.rollout_device, args.rollout_num_engines, args.engines_share_trainer_gpus) == ("cuda", 4, True)
    assert args.update_weight_mode == "tensor" and args.rollout_engine_dtype == "bfloat16"
    assert args.sglang_mem_fraction_static == 0.6 and args.sglang_max_running_requests == 512
    assert (args.sglang_chunked_prefill_size, args.sglang_max_prefill_tokens) == (8192, 32768)


def test_colocate_accepts_the_training_gpu_count_as_rollout_num_gpus():
    """slime's scripts pass --colocate with --rollout-num-gpus equal to the training GPUs: the same layout."""
    flags = ("--colocate", "--actor-num-gpus-per-node", "4", "--global-batch-size", "4")
    args = _args(*flags, "--rollout-num-gpus", "4", gpus=8)
    assert (args.rollout_num_engines, args.engines_share_trainer_gpus) == (4, True)


def test_colocate_on_cpu_still_releases_engine_memory():
    args = _args("--colocate")
    assert args.offload_train and args.offload_rollout and "memory released" in placement_line(args)


def test_without_flags_on_one_gpu_engine_and_trainer_share_it_without_releasing():
    args = _args(gpus=1)
    assert "shared as separate processes" in placement_line(args)
    assert args.engines_share_trainer_gpus and args.rollout_num_engines == 1
    assert not (args.offload_rollout or args.offload_train)
    assert args.sglang_mem_fraction_static == 0.35


def test_own_gpus_default_to_nccl_and_refuse_cuda_ipc(capsys):
    args = _args("--rollout-num-gpus", "2", "--rollout-engine-dtype", "float32", gpus=3)
    assert "2 on GPUs of their own" in placement_line(args)
    assert (args.rollout_num_engines, args.update_weight_mode, args.rollout_engine_dtype) == (
        2,
        "distributed",
        "float32",
    )
    assert not args.engines_share_trainer_gpus and args.sglang_mem_fraction_static == 0.85
    with pytest.raises(SystemExit):
        _args("--rollout-num-gpus", "1", "--update-weight-mode", "tensor", gpus=2)
    assert "CUDA IPC" in capsys.readouterr().err


def test_engine_threads_follow_the_placed_engine_count():
    """Threads per engine are settled after placement: 4 GPUs give 4 engines, whatever --rollout-num-engines said."""
    import os

    args = _args("--actor-num-gpus-per-node", "4", "--global-batch-size", "4", gpus=4)
    assert args.rollout_num_engines == 4
    assert args.rollout_engine_threads == max(1, (os.cpu_count() or 1) // 4)


def test_async_on_cpu_splits_the_cores_between_engines_and_trainer(monkeypatch):
    """--async on CPU: engines and trainer compute at once, so together they take the cores once, not twice."""
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    sync, overlapped = _args(), _args("--async")
    assert (sync.rollout_engine_threads, sync.train_threads) == (8, 0)  # 0: the rank takes cores / ranks
    assert (overlapped.rollout_engine_threads, overlapped.train_threads) == (4, 4)
    two = _args("--async", "--actor-num-gpus-per-node", "2", "--rollout-num-engines", "2")
    assert (two.rollout_engine_threads, two.train_threads) == (2, 2)


@pytest.mark.parametrize(
    "flags, gpus, message",
    [
        (["--rollout-num-gpus", "2"], 2, "= 3 GPUs, but the cluster has 2"),
        (["--rollout-num-gpus-per-engine", "2"], 2, "no tensor parallelism"),
        (["--actor-num-nodes", "2", "--global-batch-size", "2"], 2, "--actor-num-nodes 1"),
        (["--debug-rollout-only"], 1, "needs --rollout-num-gpus"),
        (["--rollout-backend", "sglang", "--rollout-num-gpus-per-engine", "2"], 2, "GPUs of their own"),
        (
            ["--rollout-backend", "sglang", "--rollout-num-gpus", "3", "--rollout-num-gpus-per-engine", "2"],
            4,
            "not a multiple of --rollout-num-gpus-per-engine 2",
        ),
        (["--rollout-backend", "sglang", "--lora-rank", "8", "--lora-sync", "adapters"], 1, "LoRA API"),
    ],
)
def test_layouts_the_cluster_cannot_hold_name_the_flags(capsys, flags, gpus, message):
    with pytest.raises(SystemExit):
        _args(*flags, gpus=gpus)
    assert message in capsys.readouterr().err


def test_colocate_with_own_engine_gpus_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        _args("--colocate", "--rollout-num-gpus", "2")
    assert "--rollout-num-gpus 2 asks for another count" in capsys.readouterr().err


def test_settled_flags_that_never_run_give_their_router_port_back(tiny_model_path):
    """The router's port is reserved (a bound socket) when the flags are settled; flags dropped without a run
    release it, so settling many configurations leaks no sockets."""
    import gc
    import os

    from slime.config.arguments import parse_args
    from slime.utils.http_utils import _RESERVED

    flags = ["--hf-checkpoint", tiny_model_path, "--prompt-data", "builtin:arithmetic:train:8:0", "--rm-type", "math"]
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        args = parse_args(flags)
        assert ("127.0.0.1", args.sglang_router_port) in _RESERVED
    del args
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) - before < 5


def test_tensor_parallel_engines_of_vllm_or_sglang_take_their_gpus_in_groups():
    args = _args("--rollout-backend", "sglang", "--rollout-num-gpus", "4", "--rollout-num-gpus-per-engine", "2", gpus=6)
    assert (args.rollout_num_engines, args.rollout_device, args.update_weight_mode) == (2, "cuda", "distributed")
    vllm = _args("--rollout-backend", "vllm", "--rollout-num-gpus", "4", "--rollout-num-gpus-per-engine", "4", gpus=5)
    assert (vllm.rollout_num_engines, vllm.update_weight_mode) == (1, "disk")
