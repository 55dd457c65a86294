"""--rollout-external-engine-addrs: engines started elsewhere are used, given weights, and left running."""

import json

import pytest

from slime.config.arguments import parse_args
from slime.engine.launch import launch_engine
from slime.utils.http_utils import request_sync


def test_a_run_uses_external_engines_and_leaves_them_running(ray_cluster, tiny_model_path, tmp_path):
    from slime.train import train

    engine = launch_engine(tiny_model_path, tmp_path / "engine_logs", num_threads=1)
    try:
        out = tmp_path / "run"
        addr = engine.url.removeprefix("http://")
        flags = (
            f"--hf-checkpoint {tiny_model_path} --prompt-data builtin:arithmetic:train:32:0 --input-key prompt "
            "--custom-rm-path tests.custom_hooks.token_reward --rollout-batch-size 2 --n-samples-per-prompt 2 "
            "--global-batch-size 4 --rollout-max-response-len 6 --num-rollout 2 --lr 0.01 "
            f"--rollout-external-engine-addrs {addr} --output-dir {out}"
        )
        args = parse_args(flags.split())
        assert args.rollout_num_engines == 1 and args.rollout_external_engine_addrs == [engine.url]
        train(args)
        steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
        assert [s["rollout/weight_version"] for s in steps] == [0, 1]  # the external engine got the new weights
        assert all(s["sync/tensors"] > 0 for s in steps)
        assert engine.alive() and request_sync("GET", engine.url + "/health")[0] == 200
    finally:
        engine.stop()
    with pytest.raises(SystemExit):
        parse_args([*flags.split(), "--colocate"])
