"""slime's SFT recipe (scripts/run-*-sft.sh): sft_rollout + sft_loss + --debug-train-only, and its loss mask."""

import json
import pickle
import time

import pytest

from slime.config.arguments import parse_args
from slime.utils.mask_utils import MultiTurnLossMaskGenerator, get_response_lengths
from slime.utils.processing_utils import load_tokenizer
from tests.conftest import SHARED_DATA


def _conversations(n: int) -> list[dict]:
    """GSM8K rows as chat data: the question, then the reference solution as the assistant's turn."""
    rows = []
    with open(SHARED_DATA / "gsm8k" / "train.jsonl") as f:
        for line in f:
            row = json.loads(line)
            messages = row["prompt"] + [{"role": "assistant", "content": row["metadata"]["solution"]}]
            rows.append({"messages": messages})
            if len(rows) == n:
                break
    return rows


def test_loss_mask_covers_exactly_the_assistant_turns(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "content": "That makes 20."},
    ]
    tokens, mask = MultiTurnLossMaskGenerator(tok, "qwen").get_loss_mask(messages)
    assert tokens == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert len(mask) == len(tokens)
    # the trained spans, decoded: each assistant answer with its end-of-turn marker, nothing of the other turns
    spans, current = [], []
    for t, m in zip(tokens, mask, strict=True):
        if m:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    assert [s.strip() for s in spans] == ["It is 5.<|im_end|>", "That makes 20.<|im_end|>"]
    (length,) = get_response_lengths([mask])
    assert length == len(mask) - mask.index(1)
    with pytest.raises(ValueError, match="no assistant turn"):
        MultiTurnLossMaskGenerator(tok).get_loss_mask(messages[:2])
    with pytest.raises(ValueError, match="--loss-mask-type"):
        MultiTurnLossMaskGenerator(tok, "llama")


def test_num_epoch_sets_num_rollout_from_the_prompts(tiny_model_path, write_jsonl):
    data = write_jsonl(_conversations(10))
    flags = f"--hf-checkpoint {tiny_model_path} --prompt-data {data} --input-key messages --rm-type math"
    flags += " --rollout-batch-size 4"
    args = parse_args(f"{flags} --num-epoch 3 --global-batch-size 4".split())
    assert args.num_rollout == 3 * 10 // 4
    with pytest.raises(SystemExit):
        parse_args(f"{flags} --num-epoch 0".split())


def test_sft_run_trains_without_engines_and_replays_saved_rollouts(ray_cluster, tiny_model_path, tmp_path, write_jsonl):
    """slime's SFT flag set on the tiny model: the conversations' assistant turns are learnt (the loss falls over
    three epochs of the same eight conversations), no engine is started and no weights are synced; the rollouts
    saved with --save-debug-rollout-data replay through --load-debug-rollout-data."""
    from slime.train import train

    data = write_jsonl(_conversations(8))
    out, dump = tmp_path / "run", tmp_path / "dump" / "rollout_{rollout_id}.pkl"
    flags = (
        f"--hf-checkpoint {tiny_model_path} --prompt-data {data} --input-key messages --rollout-shuffle "
        "--rollout-function-path slime.rollout.sft_rollout.generate_rollout --num-epoch 3 "
        "--rollout-batch-size 4 --global-batch-size 4 --loss-type sft_loss --calculate-per-token-loss "
        "--disable-compute-advantages-and-returns --debug-train-only --loss-mask-type qwen "
        "--optimizer adam --lr 0.005 --lr-decay-style cosine --min-lr 1e-4 --lr-warmup-fraction 0.1 "
        f"--output-dir {out} --save-debug-rollout-data {dump}"
    )
    logging = (  # the W&B and TensorBoard flags of slime's scripts, W&B offline (no server here)
        f"--use-wandb --wandb-mode offline --wandb-dir {tmp_path / 'wb'} --wandb-project sft-check "
        f"--wandb-group g1 --use-tensorboard --tb-project-name {tmp_path / 'tb'} --tb-experiment-name e1"
    )
    train(parse_args([*flags.split(), *logging.split()]))
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [s["step"] for s in steps] == list(range(6))
    losses = [s["train/sft_loss"] for s in steps]
    assert losses[-1] < 0.8 * losses[0], losses
    assert not any(k.startswith("sync/") for s in steps for k in s)
    assert not any(k.startswith("train/advantage") for s in steps for k in s)
    (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60  # W&B's service process writes the file; give a loaded machine time
    while b"train/grad_norm" not in run.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    records = run.read_bytes()  # protobuf records: keys and project names appear as plain strings
    assert b"sft-check" in records and b"train/sft_loss" in records and b"train/grad_norm" in records
    assert (out / "wandb_run_id").read_text() in run.name
    assert list((tmp_path / "tb" / "e1").glob("events.out.tfevents.*"))
    saved = pickle.load(open(str(dump).format(rollout_id=0), "rb"))
    sample = saved["samples"][0][0]
    assert sample["loss_mask"].count(1) > 0 and len(sample["loss_mask"]) == sample["response_length"]

    replay = tmp_path / "replay"
    flags = flags.replace(f"--output-dir {out} --save-debug-rollout-data {dump}", f"--output-dir {replay}")
    flags = flags.replace("--num-epoch 3", "--num-rollout 2")
    train(parse_args([*flags.split(), "--load-debug-rollout-data", str(dump)]))
    again = [json.loads(x) for x in open(replay / "metrics.jsonl")]
    # the same samples from the same initial weights: the first step's loss repeats
    assert again[0]["train/sft_loss"] == pytest.approx(losses[0], rel=1e-5)
