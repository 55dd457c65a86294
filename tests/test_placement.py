"""Where engines run for each cluster shape and flag set (slime.ray.placement), without starting anything."""

from __future__ import annotations

import pytest

from slime.config.arguments import parse_args
from slime.ray.placement import PlacementError, engine_dtype, place_engines


def _args(*extra: str):
    return parse_args(["--hf-checkpoint", "m", "--prompt-data", "builtin:arithmetic", "--rm-type", "math", *extra])


def test_cpu_cluster_keeps_engines_on_cpu():
    args = _args("--rollout-num-engines", "2")
    assert "2 on CPU" in place_engines(args, cluster_gpus=0)
    assert (args.rollout_device, args.rollout_num_engines, args.update_weight_mode) == ("cpu", 2, "tensor")
    assert engine_dtype(args) == "float32" and not args.offload_rollout


def test_colocate_shares_every_training_gpu_and_implies_both_offloads():
    args = _args("--colocate", "--actor-num-gpus-per-node", "4", "--global-batch-size", "4")
    assert args.offload_train and args.offload_rollout  # set at parse time, so CPU runs release memory too
    assert "4 on the 4 training GPU(s), colocated" in place_engines(args, cluster_gpus=8)
    assert (args.rollout_device, args.rollout_num_engines, args.engines_share_trainer_gpus) == ("cuda", 4, True)
    assert args.update_weight_mode == "tensor" and engine_dtype(args) == "bfloat16"


def test_without_flags_on_one_gpu_engine_and_trainer_share_it_without_releasing():
    args = _args()
    assert "shared as separate processes" in place_engines(args, cluster_gpus=1)
    assert args.engines_share_trainer_gpus and args.rollout_num_engines == 1
    assert not (args.offload_rollout or args.offload_train)


def test_own_gpus_default_to_nccl_and_refuse_cuda_ipc():
    args = _args("--rollout-num-gpus", "2", "--rollout-engine-dtype", "float32")
    assert "2 on GPUs of their own" in place_engines(args, cluster_gpus=3)
    assert (args.rollout_num_engines, args.update_weight_mode, engine_dtype(args)) == (2, "distributed", "float32")
    assert not args.engines_share_trainer_gpus
    with pytest.raises(PlacementError, match="CUDA IPC"):
        place_engines(_args("--rollout-num-gpus", "1", "--update-weight-mode", "tensor"), cluster_gpus=2)


@pytest.mark.parametrize(
    "flags, gpus, message",
    [
        (["--rollout-num-gpus", "2"], 2, "= 3 GPUs, but the cluster has 2"),
        (["--rollout-num-gpus-per-engine", "2"], 2, "no tensor parallelism"),
        (["--actor-num-nodes", "2", "--global-batch-size", "2"], 2, "--actor-num-nodes 1"),
        (["--debug-rollout-only"], 1, "needs --rollout-num-gpus"),
    ],
)
def test_layouts_the_cluster_cannot_hold_name_the_flags(flags, gpus, message):
    with pytest.raises(PlacementError, match=message):
        place_engines(_args(*flags), cluster_gpus=gpus)


def test_colocate_with_own_engine_gpus_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        _args("--colocate", "--rollout-num-gpus", "1")
    assert "drop --rollout-num-gpus" in capsys.readouterr().err
