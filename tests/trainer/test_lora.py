"""LoRA (--lora-rank): the loss and gradients are full fine-tuning's on the merged weights (float64), the KL
reference is the base model under the adapters, engines serve the merged weights, checkpoints hold the adapters
only, exports load in PEFT, and a resumed run repeats the uninterrupted one."""

import json
import os
import shutil

import pytest
import torch

from slime.config.arguments import parse_args
from slime.trainer.lora import LoraSpec, adapters_disabled, add_adapters, merged_parameters
from slime.trainer.loss import MicroBatch, micro_batch_loss
from slime.trainer.packing import forward_log_probs
from tests.trainer.test_checkpoint import TIMING, _loop_args, _metrics


def _models(path: str, spec: LoraSpec):
    from transformers import AutoModelForCausalLM

    load = dict(dtype=torch.float64, attn_implementation="eager")
    base = AutoModelForCausalLM.from_pretrained(path, **load)
    lora = add_adapters(AutoModelForCausalLM.from_pretrained(path, **load), spec)
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at init would make dL/dA vanish: give both factors values
        for name, p in lora.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    full = AutoModelForCausalLM.from_pretrained(path, **load)
    full.load_state_dict(dict(merged_parameters(lora)), strict=False)  # the tied output layer follows the embedding
    return base, lora, full


def test_lora_loss_and_gradients_are_full_fine_tuning_on_the_merged_weights(tiny_model_path):
    """With W' = W + s·B·A the LoRA model computes what a full model holding W' computes, so its policy loss is the
    same and, by the chain rule, dL/dB = s·G·Aᵀ and dL/dA = s·Bᵀ·G, G = dL/dW' of full fine-tuning."""
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    base, lora, full = _models(tiny_model_path, spec)
    args = parse_args(
        f"--hf-checkpoint {tiny_model_path} --prompt-data builtin:arithmetic:train:8:0 --rm-type math".split()
    )
    tokens = [[1, 5, 9, 22, 40, 41, 42], [1, 7, 8, 30, 31], [1, 3, 4, 5, 6, 7, 8, 9]]
    lengths = [3, 2, 4]
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(sum(lengths), generator=gen, dtype=torch.float64)

    def loss_of(model):
        out = forward_log_probs(model, tokens, lengths, temperature=1.0)
        batch = MicroBatch(
            mask=torch.ones(sum(lengths), dtype=torch.float64), lengths=lengths, normalizer=len(lengths),
            advantages=advantages, old_log_probs=out["log_probs"].detach() - 0.05,
        )  # fmt: skip
        return micro_batch_loss(args, batch, out)[0]

    lora_loss, full_loss = loss_of(lora), loss_of(full)
    assert lora_loss.item() == pytest.approx(full_loss.item(), rel=1e-12, abs=1e-14)
    lora_loss.backward()
    full_loss.backward()
    params = dict(lora.named_parameters())
    full_params = dict(full.named_parameters())
    checked = 0
    for name, p in params.items():
        if ".lora_A." not in name:
            assert p.grad is None or ".lora_B." in name  # nothing else trains
            continue
        owner = name.split(".lora_A.")[0]
        a, b = p, params[f"{owner}.lora_B.default.weight"]
        g = full_params[f"{owner}.weight"].grad
        s = spec.scaling
        # float64 throughout, except that the model's RMSNorm computes in float32 whatever its input: the two
        # models round there at different points, so they agree to float32's ~1e-7, not float64's 1e-16
        for got, want in ((b.grad, s * g @ a.detach().T), (a.grad, s * b.detach().T @ g)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=owner)
        checked += 1
    assert checked == 3 * 2  # q, v and down projections of both layers

    ids = torch.tensor([tokens[0]])
    with torch.no_grad(), adapters_disabled(lora):  # the KL reference: the base model, no second copy
        assert torch.equal(lora(input_ids=ids).logits, base(input_ids=ids).logits)
    with torch.no_grad():
        assert not torch.allclose(lora(input_ids=ids).logits, base(input_ids=ids).logits)


def test_bad_lora_flags_are_refused_by_name(tiny_model_path, capsys):
    base = f"--hf-checkpoint {tiny_model_path} --prompt-data builtin:arithmetic:train:8:0 --rm-type math --lora-rank 4"
    base = base.split()
    for extra, message in [
        (["--lora-dropout", "1.5"], "--lora-dropout in [0, 1)"),
        (["--use-kl-loss", "--ref-update-interval", "2"], "--ref-update-interval moves the KL reference"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert message in capsys.readouterr().err
    assert parse_args(base).lora_alpha == 8.0  # 2 x rank by default


LORA = ["--lora-rank", "4", "--lora-alpha", "16", "--lora-target-modules", "q_proj", "v_proj", "up_proj"]


def test_a_lora_run_serves_merged_weights_saves_adapters_and_resumes_exactly(ray_cluster, tiny_model_path, tmp_path):
    """Two rollouts with a KL loss against the base model: the engines serve the merged weights (their log-probs
    are the trained policy's), checkpoints hold the adapters and their optimizer state only, the exported adapter
    loads in PEFT and gives the exported merged model's outputs, and a run stopped after its first checkpoint and
    resumed repeats every metric of the uninterrupted run."""
    from transformers import AutoModelForCausalLM

    from slime.train import train
    from slime.trainer import checkpoint

    def run(out, rollouts, extra=()):
        ckpt = str(out / "ckpt")
        flags = _loop_args(tiny_model_path, out, "--rollout-shuffle", "--sglang-enable-deterministic-inference",
                           "--num-rollout", str(rollouts), "--save-interval", "1", "--save", ckpt, "--load", ckpt,
                           "--use-kl-loss", "--kl-loss-coef", "0.1", *LORA, *extra)  # fmt: skip
        return train(parse_args(flags))

    whole, split = tmp_path / "whole", tmp_path / "split"
    export = tmp_path / "hf_{rollout_id}"
    run(whole, 2, ["--save-hf", str(export), "--save-hf-merged"])
    # the same command stopped after its first checkpoint: its --save folder as it was then, resumed
    shutil.copytree(whole / "ckpt" / "iter_0000000", split / "ckpt" / "iter_0000000")
    (split / "ckpt" / checkpoint.POINTER).write_text("0")
    shutil.copy(whole / "run.json", split / "run.json")
    with open(whole / "metrics.jsonl") as f, open(split / "metrics.jsonl", "w") as g:
        g.write(f.readline())
    run(split, 2)
    a, b = _metrics(whole), _metrics(split)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1]
    for ma, mb in zip(a, b, strict=True):
        differ = {k: (ma[k], mb[k]) for k in ma if not any(t in k for t in TIMING) and ma[k] != mb.get(k)}
        assert not differ, f"step {ma['step']}: {differ}"
    assert a[1]["train/grad_norm"] > 0 and a[1]["train/kl_loss"] != 0  # the adapters moved away from the base
    # rollout 1 was generated after the first sync: the engine's log-probs are the trained policy's, so it serves
    # the merged weights (the base weights would be as far off as the KL says)
    assert a[1]["train/logprob_abs_diff_vs_rollout"] < 1e-4

    # the checkpoint: adapters and their AdamW moments, nothing of the frozen base
    folder = checkpoint.latest(str(whole / "ckpt"))[1]
    import torch.distributed.checkpoint as dcp

    keys = list(dcp.FileSystemReader(str(folder / "policy")).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), [k for k in model_keys if ".lora_" not in k]
    assert json.loads((folder / "lora.json").read_text())["rank"] == 4
    adapter_bytes = sum(f.stat().st_size for f in (folder / "policy").iterdir())
    assert adapter_bytes < os.path.getsize(os.path.join(tiny_model_path, "model.safetensors")) / 2

    # the exports: PEFT's adapter and the merged model give the same greedy tokens as the engine served
    from peft import PeftModel

    out1 = tmp_path / "hf_1"
    merged = AutoModelForCausalLM.from_pretrained(out1 / "merged", dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), out1)
    prompt = torch.tensor([[1, 5, 9, 22, 40]])
    greedy = dict(max_new_tokens=8, do_sample=False)
    expect = merged.generate(prompt, **greedy)[0, 5:].tolist()
    assert peft.generate(input_ids=prompt, **greedy)[0, 5:].tolist() == expect
    with torch.no_grad():
        assert torch.allclose(merged(prompt).logits, peft(input_ids=prompt).logits, atol=1e-5)

    # `slime convert` of the LoRA checkpoint: the same adapter and merged model as the run's own export
    converted = checkpoint.convert(str(whole / "ckpt"), tmp_path / "converted")
    from safetensors.torch import load_file

    for rel in ("adapter_model.safetensors", "merged/model.safetensors"):
        ours, theirs = load_file(converted / rel), load_file(out1 / rel)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), rel


def test_a_checkpoint_resumes_only_under_the_adapters_it_holds(tmp_path):
    from slime.trainer.lora import check_spec, write_spec

    spec = LoraSpec(rank=4, alpha=16.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
    write_spec(tmp_path, spec, "/models/base")
    check_spec(tmp_path, spec)  # the same flags: fine
    with pytest.raises(ValueError, match=r"rank 4, alpha 16.0.*the flags ask for rank 8"):
        check_spec(tmp_path, LoraSpec(8, 16.0, 0.0, ("q_proj", "v_proj")))
    with pytest.raises(ValueError, match="resume with the same --lora-\\* flags"):
        check_spec(tmp_path, None)
    with pytest.raises(ValueError, match="fully fine-tuned model"):
        check_spec(tmp_path / "elsewhere", spec)
