"""slime's run-script flags (Megatron model, parallelism, recompute, precision; SGLang server features): honoured,
accepted as inert with one warning, or refused naming the flag. The flag sets are written after the shape of slime's
run scripts (MODEL_ARGS, PERF_ARGS, OPTIMIZER_ARGS, MISC_ARGS, SGLANG_ARGS), with CPU sizes."""

from __future__ import annotations

import logging

import pytest
import torch

from slime.config.arguments import parse_args

BASE = ["--hf-checkpoint", "m", "--prompt-data", "builtin:arithmetic", "--rm-type", "deepscaler"]
MODEL_ARGS = (
    "--swiglu --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 "
    "--group-query-attention --num-query-groups 2 --use-rotary-position-embeddings --disable-bias-linear "
    "--normalization RMSNorm --norm-epsilon 1e-6 --rotary-base 10000 --vocab-size 49152 --kv-channels 16 "
    "--qk-layernorm --untie-embeddings-and-output-weights "
).split()
PERF_ARGS = (
    "--tensor-model-parallel-size 1 --sequence-parallel --pipeline-model-parallel-size 1 "
    "--context-parallel-size 1 --expert-model-parallel-size 1 --expert-tensor-parallel-size 1 "
    "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "
    "--use-dynamic-batch-size --max-tokens-per-gpu 512 "
).split()
MISC_ARGS = (
    "--optimizer adam --attention-dropout 0.0 --hidden-dropout 0.0 --accumulate-allreduce-grads-in-fp32 "
    "--attention-softmax-in-fp32 --attention-backend flash --sglang-mem-fraction-static 0.7 "
    "--sglang-enable-dp-attention --sglang-dp-size 1 "
).split()


def test_a_run_scripts_flag_set_starts_and_says_what_has_no_effect(caplog):
    with caplog.at_level(logging.WARNING, logger="slime.config"):
        args = parse_args(BASE + MODEL_ARGS + PERF_ARGS + MISC_ARGS)
    assert args.activation_checkpointing == "all" and args.optimizer == "adam"
    text = caplog.text
    assert "--attention-backend" in text and "--sglang-enable-dp-attention" in text and "--sequence-parallel" in text
    assert "--num-layers" in text and "--swiglu" in text  # architecture flags: named as without effect
    assert "--recompute-granularity" not in text  # honoured, so not in the warning


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2 does not divide the 1 training ranks"),
        (
            ["--tensor-model-parallel-size", "2", "--actor-num-gpus-per-node", "2", "--advantage-estimator", "ppo"],
            "the critic (--advantage-estimator ppo) trains without tensor parallelism",
        ),
        (["--pipeline-model-parallel-size", "4"], "--pipeline-model-parallel-size 4: this trainer has no pipeline"),
        (["--context-parallel-size", "2"], "--context-parallel-size 2"),
        (["--expert-model-parallel-size", "8"], "--expert-model-parallel-size 8"),
        (["--optimizer", "sgd"], "--optimizer sgd: only adam"),
        (["--enable-mtp-training"], "--enable-mtp-training"),
        (["--recompute-granularity", "full", "--recompute-method", "block"], "needs --recompute-num-layers"),
        (["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1)"),
    ],
)
def test_values_that_cannot_be_honoured_are_refused_naming_the_flag(capsys, extra, message):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert message in capsys.readouterr().err


def test_recompute_block_and_no_offload_flags():
    args = parse_args(
        BASE + ["--recompute-granularity", "full", "--recompute-method", "block"] + ["--recompute-num-layers", "3"]
    )
    assert args.activation_checkpointing == 3
    assert parse_args(BASE + ["--recompute-granularity", "selective"]).activation_checkpointing is None
    colocated = parse_args(BASE + ["--colocate", "--no-offload-train"])
    assert colocated.offload_rollout and not colocated.offload_train


def test_architecture_flags_are_checked_against_the_model_config(tiny_model_path, caplog):
    from slime.config.megatron import check_architecture

    args = parse_args(BASE[2:] + ["--hf-checkpoint", tiny_model_path] + MODEL_ARGS)
    assert check_architecture(args, tiny_model_path) == []  # the tiny Llama's own shape; vocab padded up is fine
    wrong = args.replace(num_layers="28", hidden_size="1024")
    assert check_architecture(wrong, tiny_model_path) == [
        "--num-layers 28 (num_hidden_layers 2)",
        "--hidden-size 1024 (hidden_size 64)",
    ]
    with caplog.at_level(logging.WARNING, logger="slime.config"):
        parse_args(BASE[2:] + ["--hf-checkpoint", tiny_model_path, "--num-layers", "28"], resolve_model=True)
    assert "disagree with" in caplog.text and "--num-layers 28 (num_hidden_layers 2)" in caplog.text


def test_dropout_flags_set_the_model_config_or_are_refused(tiny_model_path, capsys):
    from slime.trainer.models import dropout_overrides

    assert dropout_overrides(tiny_model_path, 0.1, 0.0) == {"attention_dropout": 0.1}
    with pytest.raises(ValueError, match="--hidden-dropout 0.1: llama models have no such dropout"):
        dropout_overrides(tiny_model_path, None, 0.1)
    with pytest.raises(SystemExit):
        parse_args(BASE[2:] + ["--hf-checkpoint", tiny_model_path, "--hidden-dropout", "0.1"], resolve_model=True)
    assert "--hidden-dropout 0.1" in capsys.readouterr().err


@pytest.mark.parametrize("which, wrapped", [("all", 2), (1, 1)])
def test_activation_checkpointing_keeps_gradients_exact(tiny_model_path, which, wrapped):
    """Recomputed layers give the same loss and gradients as stored activations (fp32, same inputs)."""
    from transformers import AutoModelForCausalLM

    from slime.trainer.models import checkpoint_layers

    ids = torch.randint(100, 2000, (1, 24), generator=torch.Generator().manual_seed(0))

    def grads(model):
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    recomputed = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    plain.train(), recomputed.train()  # as the trainer runs them: checkpointing acts in training mode only
    assert checkpoint_layers(recomputed, set(recomputed._no_split_modules), which) == wrapped
    assert sum(bool(getattr(m, "gradient_checkpointing", False)) for m in recomputed.model.layers) == wrapped
    # names unchanged: weight sync and checkpoints address parameters by name
    assert [n for n, _ in recomputed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    calls = [0] * len(recomputed.model.layers)
    for i, layer in enumerate(recomputed.model.layers):
        layer.input_layernorm.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    loss_a, grad_a = grads(plain)
    loss_b, grad_b = grads(recomputed)
    assert calls == [2] * wrapped + [1] * (len(calls) - wrapped)  # checkpointed layers run again in backward
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert torch.allclose(grad_a, grad_b, rtol=1e-5, atol=1e-7)


def test_compatibility_doc_lists_every_flag():
    """docs/compatibility.md has a row for every flag the parser accepts (honoured, inert or refused)."""
    from pathlib import Path

    from slime.config.arguments import build_parser

    doc = (Path(__file__).resolve().parents[2] / "docs" / "compatibility.md").read_text()
    flags = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    missing = sorted(f for f in flags if f"`{f}`" not in doc)
    assert missing == []


def test_tensor_parallel_needs_a_plan_and_divisible_heads(tiny_model_path):
    """The tiny Llama has 4 attention heads and 2 key/value heads: tensor-parallel 2 splits it, 4 cannot."""
    from types import SimpleNamespace

    from slime.config.megatron import check_tensor_parallel

    assert check_tensor_parallel(SimpleNamespace(tensor_model_parallel_size=2), tiny_model_path) is None
    why = check_tensor_parallel(SimpleNamespace(tensor_model_parallel_size=4), tiny_model_path)
    assert "num_key_value_heads 2" in why and "not divisible by 4" in why


def test_disable_radix_cache_is_honoured_by_the_engines(caplog):
    """slime's --sglang-disable-radix-cache turns the embedded engine's prefix cache off (and SGLang's)."""
    from slime.engine.options import command_flags, train_values

    with caplog.at_level(logging.WARNING, logger="slime.config"):
        args = parse_args(BASE + ["--sglang-disable-radix-cache"])
    assert "--sglang-disable-radix-cache" not in caplog.text  # not among the flags without effect
    values = train_values(args)
    assert "--disable-radix-cache" in command_flags(values)
    assert "--disable-radix-cache" in command_flags(values, sglang=True)
    deterministic = parse_args(BASE + ["--sglang-enable-deterministic-inference"])  # reproducible: no shared prefix
    assert deterministic.sglang_disable_radix_cache and deterministic.sglang_max_running_requests == 1
