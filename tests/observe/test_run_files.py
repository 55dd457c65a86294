"""What a run leaves to look at: the HTML report (opened in a real headless browser), the W&B offline run (read back
from its own file), sample responses, the run id in every file, and rollout dumps that replay into the same loss."""

import json
import pickle
import re
import shutil
import struct
import subprocess
import time

import pytest

from slime.config.arguments import parse_args

FLAGS = (
    "--prompt-data builtin:arithmetic:train:64:0 --input-key prompt --label-key label "
    "--custom-rm-path tests.custom_hooks.token_reward "  # rewards that differ within a group: non-zero losses
    "--rollout-batch-size 2 --n-samples-per-prompt 4 --global-batch-size 8 --rollout-max-response-len 8 --lr 0.01 "
    "--use-rollout-logprobs --eval-prompt-data small builtin:arithmetic:test:4:0 --eval-interval 2 "
    "--log-samples-count 3"
)


@pytest.fixture(scope="module")
def run(ray_cluster, tiny_model_path, tmp_path_factory):
    """One two-step GRPO run with evaluation, W&B offline and rollout dumps; (output dir, tmp dir, console)."""
    import contextlib
    import io

    from slime.train import train

    tmp = tmp_path_factory.mktemp("observe")
    out = tmp / "run"
    flags = f"--hf-checkpoint {tiny_model_path} {FLAGS} --num-rollout 2 --output-dir {out} "
    flags += f"--use-wandb --wandb-mode offline --wandb-dir {tmp / 'wb'} --wandb-project observe "
    flags += f"--save-debug-rollout-data {tmp / 'dump' / 'rollout_{rollout_id}.pkl'}"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        train(parse_args(flags.split()))
    return out, tmp, console.getvalue()


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "the report test opens the page in Debian's chromium; scripts/test.sh installs it (apt-get)"
    return path


def test_the_run_ends_with_its_report_and_a_browser_renders_every_plot(run, tmp_path):
    out, _, console = run
    report = out / "report.html"
    assert f"report: {report.resolve()}" in console
    browse = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*browse, "--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip

    marks = re.search(r'data-plots="(\d+)" data-plots-rendered="(\d+)"', dom)
    assert marks, dom[:2000]
    plots, rendered = map(int, marks.groups())
    assert plots >= 4 and rendered == plots  # reward/accuracy, length, step time, throughput: every image decoded
    assert "Evaluation: small" in dom and "Last training rollout" in dom and "--rollout-batch-size 2" in dom

    shot = tmp_path / "shot.png"
    subprocess.run([*browse, "--hide-scrollbars", "--window-size=1000,2600", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    plot_blue = int((np.abs(pixels - [31, 119, 180]).max(axis=-1) < 25).sum())
    assert plot_blue > 500  # matplotlib's first line/bar colour is on screen: the plots are drawn, not blank boxes


def _wandb_records(path):
    """The protobuf records of a W&B run file (a LevelDB-style log: 7-byte header, 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, pending = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or last of several
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_the_wandb_offline_history_equals_metrics_jsonl_and_holds_sample_tables(run):
    out, tmp, _ = run
    (path,) = (tmp / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # W&B's service process writes the file
        history = [r.history for r in _wandb_records(path) if r.WhichOneof("record_type") == "history"]
        if len(history) >= len(steps):
            break
        time.sleep(0.5)
    logged = {}
    for h in history:
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in h.item}
        logged.setdefault(h.step.num, {}).update(items)
    for row in steps:
        scalars = {k: v for k, v in row.items() if k not in ("step", "time", "run_id")}
        assert {k: logged[row["step"]][k] for k in scalars} == pytest.approx(scalars, rel=1e-6), row["step"]
    # a table is logged as its fields (W&B keeps the rows in a file beside the run)
    assert logged[0]["samples/rollout/_type"] == "table-file" and logged[0]["samples/rollout/nrows"] == 3
    assert logged[1]["samples/rollout/nrows"] == 3
    assert any(s.get("samples/eval_small/nrows") == 3 for s in logged.values())


def test_every_file_of_the_run_names_its_run_id(run):
    out, tmp, _ = run
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert len(run_id) >= 8
    assert all(json.loads(line)["run_id"] == run_id for line in open(out / "metrics.jsonl"))
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert {s["run_id"] for s in samples} == {run_id}
    assert {s["kind"] for s in samples} == {"rollout", "eval/small"}
    assert sum(s["kind"] == "rollout" for s in samples) == 2 * 3  # --log-samples-count per step
    assert all(isinstance(s["prompt"], str) and "reward" in s and s["label"] for s in samples)
    with open(tmp / "dump" / "rollout_1.pkl", "rb") as f:
        assert pickle.load(f)["run_id"] == run_id
    assert run_id in (out / "report.html").read_text()


def test_a_dump_replays_into_the_same_loss_without_engines(run, tiny_model_path):
    """The same samples from the same initial weights: the first step's losses repeat to float precision."""
    from slime.train import train

    out, tmp, _ = run
    replay = tmp / "replay"
    flags = f"--hf-checkpoint {tiny_model_path} {FLAGS} --num-rollout 1 --output-dir {replay} --debug-train-only "
    flags += f"--load-debug-rollout-data {tmp / 'dump' / 'rollout_{rollout_id}.pkl'}"
    train(parse_args(flags.split()))

    def first_step(path):
        return next(r for r in map(json.loads, open(path)) if "train/pg_loss" in r)  # after the eval-only row

    first, again = first_step(out / "metrics.jsonl"), first_step(replay / "metrics.jsonl")
    losses = [k for k in first if k.startswith("train/") and k.endswith("loss")]
    assert first["train/pg_loss"] != 0 and first["train/grad_norm"] > 0
    for k in [*losses, "train/grad_norm", "train/advantage_std"]:
        assert again[k] == pytest.approx(first[k], rel=1e-5, abs=1e-7), k
