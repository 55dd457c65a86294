"""Engines placed by Ray on a cluster of two nodes (Ray's own multi-node test cluster: two raylets on loopback, in a
subprocess so this test's cluster is not the session's): one engine per node, each listening on its node's address;
the worker node's engine is killed mid-rollout and replaced on the same node, and no sample is lost."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from slime.config.arguments import parse_args
    from slime.train import train
    from tests.trainer.test_checkpoint import _loop_args

    model, out = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    head = ray.get_runtime_context().get_node_id()
    args = parse_args(_loop_args(
        model, out, "--num-rollout", "2", "--rollout-num-engines", "2", "--use-fault-tolerance",
        "--rollout-health-check-interval", "0.5", "--rollout-health-check-timeout", "3",
        "--custom-generate-function-path", "tests.custom_hooks.kill_worker_node_engine_generate",
        "--rollout-max-response-len", "24",
    ))
    train(args)
    print("RESULT", json.dumps({"head": head, "worker": worker.node_id}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_engines_spread_over_two_nodes_and_a_lost_one_is_replaced_on_its_node(tiny_model_path, tmp_path):
    script, out = tmp_path / "multinode.py", tmp_path / "run"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run(
        [sys.executable, str(script), tiny_model_path, str(out)], capture_output=True, text=True, timeout=600, env=env
    )
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, run.stdout[-3000:] + run.stderr[-5000:]
    nodes = json.loads(line[0][len("RESULT ") :])
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [s["rollout/engine_restarts"] for s in steps] == [0, 1]
    assert all(s["rollout/failed"] == 0 and s["rollout/kept_groups"] == 4 for s in steps)
    assert [s["rollout/weight_version"] for s in steps] == [0, 1]
    # the replacement generated with the trainer's weights: the trainer reproduces its log-probs
    assert all(s["train/logprob_abs_diff_vs_rollout"] < 1e-4 for s in steps)
    engines = json.loads((out / "server_logs" / "engines.json").read_text())
    by_node = {e["node_id"]: e for e in engines}
    assert set(by_node) == {nodes["head"], nodes["worker"]}  # one engine per node
    replaced = by_node[nodes["worker"]]
    assert replaced["name"].endswith("-restart1")  # replaced in its bundle, on the worker node
    assert os.path.exists(replaced["log_path"])  # a log of its own, the dead engine's kept beside it
    assert os.path.exists(replaced["log_path"].replace("-restart1.log", ".log"))
    assert by_node[nodes["head"]]["name"] in ("engine-0", "engine-1")
    # on a cluster of several nodes engines listen on their node's address, not loopback
    assert all(e["url"].startswith(f"http://{e['node_ip']}:") for e in engines)


def test_an_engine_that_cannot_launch_is_named_with_the_reason(ray_cluster, tiny_model_path, tmp_path):
    """A launch that fails inside the host actor surfaces as one error naming the engine and the cause, not as
    Ray's task traceback."""
    import pytest

    from slime.ray.engine_host import RayEngine

    with pytest.raises(RuntimeError, match="engine-9: could not be launched: TypeError: unknown engine option"):
        RayEngine.start("engine-9", {}, tiny_model_path, str(tmp_path), False, {"no_such_option": 1}, timeout_s=120)
