"""slime's on-policy distillation with a served teacher (--opd-type sglang): the teacher is an engine server, the
built-in reward fills Sample.teacher_log_probs from its prompt log-probs, the trainer distils towards them."""

import json
import pickle

import torch

from slime.config.arguments import parse_args
from slime.engine.launch import launch_engine


def test_served_teacher_log_probs_drive_the_distillation(ray_cluster, tiny_model_path, tiny_teacher_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from slime.train import train

    teacher = launch_engine(tiny_teacher_path, tmp_path / "teacher_logs", num_threads=1)
    try:
        out, dump = tmp_path / "run", tmp_path / "rollout_{rollout_id}.pkl"
        flags = (
            f"--hf-checkpoint {tiny_model_path} --prompt-data builtin:arithmetic:train:32:0 --input-key prompt "
            "--rollout-batch-size 2 --n-samples-per-prompt 2 --global-batch-size 4 --rollout-max-response-len 8 "
            "--num-rollout 2 --lr 0.01 --rollout-temperature 0.9 "
            "--custom-rm-path slime.rollout.on_policy_distillation.reward_func "
            "--custom-reward-post-process-path slime.rollout.on_policy_distillation.post_process_rewards "
            f"--rm-url {teacher.url}/generate --use-opd --opd-type sglang --opd-kl-coef 1.0 "
            f"--output-dir {out} --save-debug-rollout-data {dump}"
        )
        train(parse_args(flags.split()))
    finally:
        teacher.stop()
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    # rewards are all 0: the advantages (and the gradient) come from the teacher's log-probs alone
    assert all(s["rollout/reward_mean"] == 0 and s["train/advantage_abs_max"] > 0 for s in steps)
    assert all(s["train/grad_norm"] > 0 for s in steps)
    samples = [s for g in pickle.load(open(str(dump).format(rollout_id=0), "rb"))["samples"] for s in g]
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_path, dtype=torch.float32).eval()
    for s in samples:
        tokens, r = s["tokens"], s["response_length"]
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, len(tokens) - r - 1 : -1].double() / 0.9
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[-r:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(s["teacher_log_probs"], dtype=torch.float64), ref, atol=1e-4)
