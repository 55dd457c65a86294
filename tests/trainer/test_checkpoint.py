"""Checkpoints, exact resume, Hugging Face export and fault handling, on the tiny model with the real engine, router
and Ray."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from slime.config.arguments import parse_args
from slime.observe.metrics import MetricsLogger
from slime.ray.train_group import TrainerError, TrainGroup
from slime.rollout.data_source import RolloutDataSourceWithBuffer
from slime.rollout.manager import load_data_source
from slime.trainer import checkpoint
from slime.utils.types import Sample
from tests.trainer.test_training import _synthetic_batch

ROOT = Path(__file__).resolve().parents[2]
# wall-clock metrics and the run id: the only ones allowed to differ between two runs of one command
TIMING = ("seconds", "per_s", "time", "overlap", "run_id")


def _loop_args(model: str, out: Path, *extra: str) -> list[str]:
    return [
        "--hf-checkpoint",
        model,
        "--prompt-data",
        "builtin:arithmetic:train:64:0",
        "--input-key",
        "prompt",
        "--custom-rm-path",
        "tests.custom_hooks.token_reward",
        "--rollout-batch-size",
        "4",
        "--n-samples-per-prompt",
        "4",
        "--global-batch-size",
        "8",
        "--rollout-max-response-len",
        "12",
        "--lr",
        "0.01",
        "--output-dir",
        str(out),
        *extra,
    ]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _train_cmd(model: str, out: Path, entry: str = "train.py") -> list[str]:
    ckpt = str(out / "ckpt")
    extra = [
        "--rollout-shuffle",
        "--sglang-enable-deterministic-inference",
        "--num-rollout",
        "4",
        "--save-interval",
        "2",
        "--save",
        ckpt,
        "--load",
        ckpt,
    ]
    return [sys.executable, entry, *_loop_args(model, out, *extra)]


def test_killed_run_resumes_to_the_uninterrupted_runs_metrics(ray_cluster, tiny_model_path, tmp_path, capfd):
    """The same command, run whole and run killed (-9) right after its first checkpoint then started again:
    every metric of every step is equal, timings aside. The run overlaps generation with training
    (train_async.py), the harder case for a checkpoint, whose save and resume code the synchronous loop shares:
    the checkpoint after step 1 also holds rollout 2, generated during step 1's training, and the resumed run
    trains it, as the whole run does, one step after the weights that generated it. The killed run is a process
    of its own; the whole and the resumed run share this module's Ray cluster."""
    from slime.train import train

    entry = "train_async.py"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(parse_args(["--async", *_train_cmd(tiny_model_path, whole, entry)[2:]]))
    killed.mkdir()
    with open(killed / "first.log", "w") as log:
        cmd = _train_cmd(tiny_model_path, killed, entry)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        pointer = killed / "ckpt" / checkpoint.POINTER
        deadline = time.monotonic() + 300
        while not pointer.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (killed / "first.log").read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert pointer.read_text() == "1" and len(_metrics(killed)) == 2  # killed in rollout 2, before its metrics
    capfd.readouterr()
    train(parse_args(["--async", *cmd[2:]]))
    assert "next rollout 2" in capfd.readouterr().out
    a, b = _metrics(whole), _metrics(killed)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3]
    assert len({m["run_id"] for m in b}) == 1  # the resumed run is the killed run, under its id
    for ma, mb in zip(a, b, strict=True):
        assert ma.keys() == mb.keys()
        differ = {k: (ma[k], mb[k]) for k in ma if not any(t in k for t in TIMING) and ma[k] != mb[k]}
        assert not differ, f"step {ma['step']}: {differ}"
    for k, m in enumerate(a):  # rollout k (k > 0) is generated on the weights after step k - 2, version k - 1
        assert m["rollout/weight_version"] == max(k - 1, 0)
        assert m["train/staleness_mean"] == m["train/staleness_max"] == min(k, 1)
    assert a[3]["train/optimizer_steps"] == 8
    assert all(0 < m["perf/overlap_ratio"] <= 1 for m in a[1:])  # rollouts 1-3 generated during a training
    assert sorted(os.listdir(killed / "ckpt")) == ["iter_0000001", "iter_0000003", checkpoint.POINTER]


def _processes(*words: str) -> set[tuple[int, str]]:
    """(pid, command line) of every process whose command line holds one of `words`."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(w in cmdline for w in words):
            found.add((int(pid), cmdline[:200]))
    return found


def _interrupt_a_stalled_run(tmp_path: Path, cmd: list[str]) -> tuple[str, float, Path]:
    """Run `cmd` (a training run whose grading stalls from rollout 1 on) in its own process group, send SIGINT to
    the group (as a terminal does) once the stall has begun, and return its output, the seconds from SIGINT to its
    exit (status 130) and its output folder."""
    out = Path(cmd[cmd.index("--output-dir") + 1])
    cmd[cmd.index("tests.custom_hooks.token_reward")] = "tests.custom_hooks.stalls_after_first_rollout"
    mark = tmp_path / "stalled"
    env = {**os.environ, "SLIME_TEST_STALL_MARK": str(mark)}
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not mark.exists():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
                time.sleep(0.1)
            time.sleep(0.5)
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=120) == 130, (tmp_path / "log").read_text()[-3000:]
            stopped_after = time.monotonic() - sent
        finally:
            if proc.poll() is None:  # a failed check must not leave the run going
                os.killpg(proc.pid, signal.SIGKILL)
    print(f"{cmd[1]}: stopped {stopped_after:.1f}s after Ctrl-C")
    text = (tmp_path / "log").read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "Ctrl-C: a rollout under way is cut short (a training step under way finishes), then write a" in text
    assert f"continue with --load {out / 'ckpt'}" in text and "interrupted: trainer, engines and router stopped" in text
    return text, stopped_after, out


def _assert_step_0_checkpointed_before_rollout_1(out: Path, stopped_after: float) -> None:
    assert stopped_after < 30, f"{stopped_after:.1f}s from Ctrl-C to exit"  # the stalled rollout would take 600 s
    assert len(_metrics(out)) == 1 and (out / "ckpt" / checkpoint.POINTER).read_text() == "0"
    with open(out / "ckpt" / "iter_0000000" / "data_source.pkl", "rb") as f:
        state = pickle.load(f)
    assert state["offset"] == 4 and state["buffer"] == []  # rollout 0 took prompts 0-3; rollout 1's come again
    assert not (out / "ckpt" / "iter_0000000" / "untrained_rollouts.pkl").exists()


def test_ctrl_c_cuts_a_rollout_short_and_checkpoints_the_last_trained_step(tiny_model_path, tmp_path):
    """Ctrl-C while a rollout generates (train.py; its grading stalls for 10 minutes): the run stops in seconds, not
    after the rollout, with the last trained step checkpointed and the data source put back to before the cut
    rollout, so a resumed run generates those prompts again."""
    out = tmp_path / "run"
    extra = ["--num-rollout", "100", "--save", str(out / "ckpt"), "--save-interval", "1000"]
    _, stopped_after, out = _interrupt_a_stalled_run(
        tmp_path, [sys.executable, "train.py", *_loop_args(tiny_model_path, out, *extra)]
    )
    _assert_step_0_checkpointed_before_rollout_1(out, stopped_after)


def test_ctrl_c_stops_an_async_run_cleanly(tiny_model_path, tmp_path):
    """Ctrl-C during a train_async.py run while the weight sync after step 0 waits for rollout 1, generated during
    that step and stalled: the rollout is cut, step 0 is logged and checkpointed (the run saves no other) with the
    data source before rollout 1, exit status 130, a line naming that checkpoint instead of a traceback, and no
    engine, router or Ray process of the run left behind."""
    words = ("slime.engine.server", "raylet", "router", "ray::", "gcs_server")
    before = _processes(*words)
    out = tmp_path / "run"
    cmd = [sys.executable, "train_async.py", *_loop_args(tiny_model_path, out, "--num-rollout", "100")]
    cmd += ["--save", str(out / "ckpt"), "--save-interval", "1000"]
    _, stopped_after, out = _interrupt_a_stalled_run(tmp_path, cmd)
    _assert_step_0_checkpointed_before_rollout_1(out, stopped_after)
    deadline = time.monotonic() + 30
    while (left := _processes(*words) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left


KILL_DURING_SAVE = textwrap.dedent("""
    import sys, time, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from slime.trainer import checkpoint
    from slime.trainer.models import load_policy
    model_path, save = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = load_policy(model_path, torch.device("cpu"), init_device_mesh("cpu", (1,)), True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    def step_and_save(rollout_id, hang):
        model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.mean().backward()
        opt.step(); opt.zero_grad()
        staged = checkpoint.staging_dir(save, rollout_id)
        checkpoint.save_model(model, opt, staged / "policy")
        (staged / "rollout.json").write_text('{"rollout_id": %d}' % rollout_id)
        if hang:  # shards written, not yet published: the parent kills us here
            open(save + "/writing", "w").close(); time.sleep(600)
        checkpoint.commit(save, rollout_id, staged)
    step_and_save(0, False)
    torch.save({n: p.full_tensor() for n, p in model.named_parameters()}, save + "/weights0.pt")
    step_and_save(1, True)
""")


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tiny_model_path, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, tiny_model_path, str(save)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not (save / "writing").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (save / "iter_0000001.incomplete" / "policy" / ".metadata").exists()  # the half-published one
    rollout_id, folder = checkpoint.latest(save)
    assert (rollout_id, folder.name) == (0, "iter_0000000")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    state = {"model": model.state_dict()}
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(folder / "policy"))
    saved = torch.load(save / "weights0.pt")
    assert all(torch.equal(state["model"][n], saved[n]) for n in saved)
    # the next save of rollout 1 clears the leftover and publishes whole
    staged = checkpoint.staging_dir(save, 1)
    (staged / "rollout.json").write_text('{"rollout_id": 1}')
    checkpoint.commit(save, 1, staged)
    assert checkpoint.latest(save)[0] == 1 and not (save / "iter_0000001.incomplete").exists()


def test_latest_names_a_broken_pointer(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    (tmp_path / checkpoint.POINTER).write_text("7")
    with pytest.raises(FileNotFoundError, match="iter_0000007"):
        checkpoint.latest(tmp_path)
    (tmp_path / checkpoint.POINTER).write_text("seven")
    with pytest.raises(ValueError, match=checkpoint.POINTER):
        checkpoint.latest(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "slime.cli", "convert", str(tmp_path / "nothing"), "out"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "not a slime checkpoint" in result.stderr


def test_a_damaged_checkpoint_or_a_lost_pointer_is_refused_naming_the_file(tmp_path):
    """The manifest written at commit catches a file overwritten in place (same size), truncated or removed; a
    --save folder whose pointer is gone is not taken for an empty one."""
    staged = checkpoint.staging_dir(tmp_path, 3)
    (staged / "policy").mkdir()
    shard = staged / "policy" / "__0_0.distcp"
    shard.write_bytes(os.urandom(1 << 20))
    checkpoint.write_json(staged / "rollout.json", {"rollout_id": 3})
    folder = checkpoint.commit(tmp_path, 3, staged)
    checkpoint.verify(folder)
    shard = folder / "policy" / "__0_0.distcp"
    good = shard.read_bytes()
    shard.write_bytes(good[:4096] + os.urandom(64 << 10) + good[4096 + (64 << 10) :])
    with pytest.raises(checkpoint.CheckpointError, match=r"__0_0.distcp: contents changed"):
        checkpoint.verify(folder)
    shard.write_bytes(good[:-1])
    with pytest.raises(checkpoint.CheckpointError, match=r"__0_0.distcp: 1048575 bytes, but 1048576"):
        checkpoint.verify(folder)
    shard.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"__0_0.distcp: missing"):
        checkpoint.verify(folder)
    (tmp_path / checkpoint.POINTER).unlink()
    with pytest.raises(FileNotFoundError, match=f"pass --load {folder}"):
        checkpoint.latest(tmp_path)


def save_trainer_checkpoint(group: TrainGroup, save: Path, rollout_id: int) -> None:
    """The trainer's part of a checkpoint, published with a minimal rollout.json (no rollout manager here)."""
    staged = checkpoint.staging_dir(save, rollout_id)
    group.call("save", str(staged))
    checkpoint.write_json(staged / "rollout.json", {"rollout_id": rollout_id})
    checkpoint.commit(save, rollout_id, staged)


def _trainer_args(model: str, tmp_path: Path, *extra: str):
    return parse_args(
        [
            "--hf-checkpoint",
            model,
            "--prompt-data",
            "builtin:arithmetic",
            "--rm-type",
            "math",
            "--output-dir",
            str(tmp_path),
            "--rollout-batch-size",
            "4",
            "--n-samples-per-prompt",
            "4",
            "--global-batch-size",
            "8",
            "--lr",
            "0.01",
            "--train-threads",
            "1",
            "--advantage-estimator",
            "ppo",
            "--critic-lr",
            "0.02",
            *extra,
        ]
    )


def test_two_rank_checkpoint_loads_on_one_rank_and_exports_to_hugging_face(ray_cluster, tiny_model_path, tmp_path):
    """Policy, critic and AdamW saved by 2 ranks continue on 1 rank exactly as on the 2 ranks; --save-hf and
    `slime convert` folders give the trainer's log-probs."""
    data, later = _synthetic_batch(16, seed=1), _synthetic_batch(16, seed=2)
    save, hf = tmp_path / "ckpt", tmp_path / "hf"
    two = TrainGroup(_trainer_args(tiny_model_path, tmp_path, "--actor-num-gpus-per-node", "2"))
    try:
        two.train(0, data)
        save_trainer_checkpoint(two, save, 0)
        two.call("export_hf", str(hf))
        trained_lp = torch.tensor([x for lp in two.call("log_probs", later)[0] for x in lp])
        m_two = two.train(1, later)
    finally:
        two.shutdown()
    one = TrainGroup(_trainer_args(tiny_model_path, tmp_path))
    try:
        info = one.call("load", str(checkpoint.latest(save)[1]))[0]
        assert info == {"optimizer_loaded": True, "saved_world_size": 2}
        loaded_lp = torch.tensor([x for lp in one.call("log_probs", later)[0] for x in lp])
        m_one = one.train(1, later)
    finally:
        one.shutdown()
    assert torch.equal(loaded_lp, trained_lp)
    assert m_one["train/optimizer_steps"] == m_two["train/optimizer_steps"] == 4
    for key in ("train/loss", "train/grad_norm", "train/param_norm", "critic/value_loss", "critic/grad_norm"):
        assert m_one[key] == pytest.approx(m_two[key], rel=1e-5), key
    converted = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "slime.cli", "convert", str(save), str(converted)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    for folder in (hf, converted):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        lps = []
        with torch.no_grad():
            for tokens, n in zip(later.tokens, later.response_lengths, strict=True):
                logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1] / 1.0
                lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
                lps.append(lp[-n:])
        assert torch.allclose(torch.cat(lps), trained_lp, atol=1e-5), folder


def test_buffer_and_position_survive_a_checkpoint(write_jsonl, tiny_model_path, tmp_path):
    data = write_jsonl([{"input": f"q{i}"} for i in range(5)])
    args = parse_args(
        [
            "--hf-checkpoint",
            tiny_model_path,
            "--prompt-data",
            data,
            "--rm-type",
            "math",
            "--n-samples-per-prompt",
            "2",
            "--rollout-shuffle",
        ]
    )
    source = RolloutDataSourceWithBuffer(args)
    first = source.get_samples(3)
    partial = first[1]
    for s in partial:
        s.tokens, s.response, s.response_length = [1, 2, 3], "ab", 2
        s.rollout_log_probs, s.loss_mask, s.weight_versions = [-0.5, -0.25], [1, 1], ["3"]
        s.status = Sample.Status.ABORTED
    source.add_samples([partial])
    restored = RolloutDataSourceWithBuffer(args)
    restored.load_state_dict(pickle.loads(pickle.dumps(source.state_dict())))
    assert [s.to_dict() for s in restored.buffer[0]] == [s.to_dict() for s in partial]
    a, b = source.get_samples(4), restored.get_samples(4)
    assert [[s.to_dict() for s in g] for g in a] == [[s.to_dict() for s in g] for g in b]
    assert a[0][0].response == "ab" and a[0][0].status == Sample.Status.ABORTED  # the buffer comes first
    with pytest.raises(FileNotFoundError, match="data_source.pkl is missing"):  # never a silent restart
        load_data_source(restored, Path(tmp_path), 0)


def test_metrics_of_a_resumed_run_drop_what_the_crashed_run_logged_after_its_checkpoint(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    log.log(0, {"x": 0}, echo=False)
    saved_at = time.time()
    time.sleep(0.01)
    log.log(1, {"x": 1}, echo=False)
    log.close()
    log = MetricsLogger(str(tmp_path), tensorboard=False, resume_after=saved_at, purge_step=1)
    log.log(1, {"x": 10}, echo=False)
    log.close()
    assert [(m["step"], m["x"]) for m in _metrics(tmp_path)] == [(0, 0), (1, 10)]
    MetricsLogger(str(tmp_path), tensorboard=False, resume_after=0.0, purge_step=0).close()  # --load, no checkpoint
    assert _metrics(tmp_path) == []


def test_a_new_run_does_not_append_to_an_earlier_runs_metrics(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from slime.observe.metrics import OutputDirError, claim_output_dir

    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    args = SimpleNamespace(output_dir=str(tmp_path), load=None, overwrite_output_dir=False, tb_project_name=None,
                           tb_experiment_name=None)  # fmt: skip
    claim_output_dir(args)  # an empty folder is free
    log = MetricsLogger(str(tmp_path))
    log.log(0, {"x": 0}, echo=False)
    log.log(1, {"x": 1}, echo=False)
    log.close()
    (tmp_path / "wandb_run_id").write_text("abc")
    with pytest.raises(OutputDirError, match="already holds a run .*2 logged steps.*--load.*--overwrite-output-dir"):
        claim_output_dir(args)
    claim_output_dir(SimpleNamespace(**{**vars(args), "load": str(tmp_path / "ckpt")}))  # resuming: it continues
    assert len(_metrics(tmp_path)) == 2
    claim_output_dir(SimpleNamespace(**{**vars(args), "overwrite_output_dir": True}))
    assert not any((tmp_path / name).exists() for name in ("metrics.jsonl", "tensorboard", "wandb_run_id"))


def test_the_console_line_holds_what_a_person_watches():
    from slime.observe.metrics import summary_line

    step = {"rollout/reward_mean": 0.4219, "rollout/response_len_mean": 87.4, "rollout/truncated_ratio": 0.05,
            "perf/step_seconds": 12.31, "perf/rollout_seconds": 4.12, "train/seconds": 7.93, "sync/seconds": 0.11,
            "perf/samples_per_s": 5.2, "train/staleness_max": 1.0, "train/staleness_mean": 0.75, "train/loss": 0.3,
            "eval/gsm8k/accuracy": 0.3125, "sync/bytes": 2.7e8}  # fmt: skip
    assert summary_line(step) == (
        "reward 0.422 | len 87 (5% cut) | gsm8k 31.2% | 12.3 s = rollout 4.1 + train 7.9 + sync 0.1 | "
        "5.2 samples/s | staleness 0.75"
    )
    assert summary_line({"rollout/reward_mean": 1.0, "perf/step_seconds": 3.0}) == "reward 1 | 3.0 s"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--save-interval", "2"], "--save-interval needs --save"),
        (["--save", "c", "--save-hf", "out/{step}"], "only placeholder allowed is {rollout_id}"),
        (["--save-hf", "out"], "--save-hf exports at checkpoints"),
        (["--rollout-health-check-timeout", "0"], "--rollout-health-check-timeout must be > 0"),
    ],
)
def test_checkpoint_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--hf-checkpoint", "x", "--prompt-data", "builtin:arithmetic", "--rm-type", "math", *flags])
    assert message in capsys.readouterr().err


def test_nan_updates_are_skipped_then_stop_the_run_naming_rank_and_rollout(ray_cluster, tiny_model_path, tmp_path):
    from slime.train import train

    out = tmp_path / "run"
    args = parse_args(
        _loop_args(
            tiny_model_path,
            out,
            "--num-rollout",
            "2",
            "--max-nan-steps",
            "3",
            "--loss-type",
            "custom_loss",
            "--custom-loss-function-path",
            "tests.custom_hooks.nan_loss",
        )
    )
    with pytest.raises(
        TrainerError,
        match=r"training rank 0 failed during training on rollout 1: FloatingPointError: "
        r"rank 0, rollout 1, optimizer step 3: 4 updates .* --max-nan-steps 3",
    ):
        train(args)
    (step0,) = _metrics(out)
    assert step0["train/skipped_steps"] == 2 and step0["train/optimizer_steps"] == 2
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    norm = sum(p.detach().double().square().sum() for p in initial.parameters()) ** 0.5
    assert step0["train/param_norm"] == pytest.approx(float(norm), rel=1e-6)  # nothing was applied


def test_a_hung_engine_under_async_is_restarted_and_loses_no_sample(ray_cluster, tiny_model_path, tmp_path):
    """Rollout 1: engine 1 is SIGSTOPped (alive, silent) while the previous step trains (--async). It is detected,
    replaced, given the current weights and re-registered; the requests it held are retried; every step trains on
    all 16 samples. (A SIGKILLed engine in the synchronous loop: tests/rollout/test_multinode.py, on a second node.)"""
    from slime.train import train

    out = tmp_path / "run"
    args = parse_args(
        _loop_args(
            tiny_model_path,
            out,
            "--num-rollout",
            "2",
            "--rollout-num-engines",
            "2",
            "--use-fault-tolerance",
            "--rollout-health-check-interval",
            "0.5",
            "--rollout-health-check-timeout",
            "3",
            "--custom-generate-function-path",
            "tests.custom_hooks.hang_engine_generate",
            "--rollout-max-response-len",
            "24",
            "--async",
        )
    )
    train(args)
    steps = _metrics(out)
    assert [s["rollout/engine_restarts"] for s in steps] == [0, 1]
    assert all(s["rollout/failed"] == 0 and s["rollout/kept_groups"] == 4 for s in steps)
    assert "engine-1-restart1.log" in os.listdir(out / "server_logs")
    assert [s["train/staleness_max"] for s in steps] == [0, 1]  # each rollout ran on the weights before its step


def test_one_failing_rank_stops_the_group_at_once_naming_the_rank(ray_cluster, tiny_model_path, tmp_path):
    """Rank 1 raises while rank 0 waits for it in a gradient collective: the error names rank 1 and the rollout
    without waiting for the collective's timeout, and shutdown does not hang on the stuck rank."""
    group = TrainGroup(
        _trainer_args(
            tiny_model_path,
            tmp_path,
            "--actor-num-gpus-per-node",
            "2",
            "--advantage-estimator",
            "grpo",
            "--loss-type",
            "custom_loss",
            "--custom-loss-function-path",
            "tests.custom_hooks.rank1_raises_loss",
        )
    )
    start = time.monotonic()
    with pytest.raises(
        TrainerError,
        match="training rank 1 failed during training on rollout 5: RuntimeError: custom loss exploded on purpose",
    ):
        group.train(5, _synthetic_batch(16))
    group.shutdown()
    assert time.monotonic() - start < 120  # the collective timeout is 10 minutes


NO_OPTIM = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from slime.trainer import checkpoint
    from slime.trainer.models import load_policy
    model_path, folder = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    model = load_policy(model_path, torch.device("cpu"), mesh, True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.mean().backward()
    opt.step()
    checkpoint.save_model(model, None, checkpoint.Path(folder))
    assert checkpoint.saved_keys(checkpoint.Path(folder)) == {"model"}
    fresh = load_policy(model_path, torch.device("cpu"), mesh, True)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert checkpoint.load_model(fresh, fresh_opt, checkpoint.Path(folder)) is False
    assert all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), fresh.parameters()))
    assert not fresh_opt.state  # AdamW starts fresh
    print("ok")
""")


def test_a_checkpoint_without_optimizer_state_loads_the_weights_only(tiny_model_path, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", NO_OPTIM, tiny_model_path, str(tmp_path / "policy")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_resume_restores_the_partial_rollout_buffer_and_the_critic(ray_cluster, tiny_model_path, tmp_path):
    """Rollout 0 keeps 2 groups and parks 6 aborted mid-response (--partial-rollout); the checkpoint holds them; a run
    resumed from it continues those very samples in rollout 1. PPO: the critic is saved and loaded too."""
    from slime.train import train

    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    flags = _loop_args(
        tiny_model_path,
        out,
        "--rollout-batch-size",
        "2",
        "--over-sampling-batch-size",
        "8",
        "--partial-rollout",
        "--custom-generate-function-path",
        "tests.custom_hooks:first_groups_short",
        "--rollout-max-response-len",
        "48",
        "--advantage-estimator",
        "ppo",
        "--critic-lr",
        "0.01",
        "--save",
        str(ckpt),
        "--load",
        str(ckpt),
    )
    train(parse_args([*flags, "--num-rollout", "1"]))
    with open(ckpt / "iter_0000000" / "data_source.pkl", "rb") as f:
        parked = [Sample.from_dict(s) for g in pickle.load(f)["buffer"] for s in g]
    partial = {s.index: s for s in parked if s.response_length > 0}
    assert partial and (ckpt / "iter_0000000" / "critic" / ".metadata").exists()
    damaged = tmp_path / "damaged"  # a copy with one byte of a policy shard changed is refused before Ray starts
    shutil.copytree(ckpt, damaged)
    shard = next((damaged / "iter_0000000" / "policy").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=shard.name):
        train(parse_args([*flags[:-1], str(damaged), "--num-rollout", "2"]))
    train(parse_args([*flags, "--num-rollout", "2"]))
    steps = _metrics(out)
    assert [s["step"] for s in steps] == [0, 1]
    assert steps[1]["rollout/resumed_samples"] >= len(partial)
    assert steps[1]["train/optimizer_steps"] == 2 and steps[1]["critic/grad_norm"] > 0


def test_ref_load_takes_a_checkpoint(ray_cluster, tiny_model_path, tmp_path):
    """--ref-load naming a --save folder: the reference is the checkpoint's policy, so a policy loaded from the same
    checkpoint starts with zero KL to it (and a nonzero KL to the initial model)."""
    data = _synthetic_batch(16, seed=3)
    save = tmp_path / "ckpt"
    group = TrainGroup(_trainer_args(tiny_model_path, tmp_path, "--advantage-estimator", "grpo"))
    try:
        group.train(0, data)
        save_trainer_checkpoint(group, save, 0)
    finally:
        group.shutdown()
    kl = {}
    for name, ref in {"checkpoint": str(save), "initial": tiny_model_path}.items():
        group = TrainGroup(
            _trainer_args(
                tiny_model_path,
                tmp_path,
                "--advantage-estimator",
                "grpo",
                "--use-kl-loss",
                "--kl-loss-coef",
                "0.1",
                "--ref-load",
                ref,
                "--global-batch-size",
                "16",
            )
        )
        try:
            group.call("load", str(checkpoint.latest(save)[1]))
            kl[name] = group.train(1, data)["train/kl_loss"]
        finally:
            group.shutdown()
    assert kl["checkpoint"] == 0 and abs(kl["initial"]) > 1e-4
