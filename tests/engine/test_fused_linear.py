"""Projections fused into one matrix product (slime.engine.fused_linear): the served model computes what the
unfused model computes, compiles without graph breaks, and takes weight updates under the original names."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from slime.engine.fused_linear import FusedLinear, LinearSlice, fuse_projections
from slime.engine.paged import PagedEngine
from slime.engine.sampling import SamplingParams
from tests.engine.test_paged_engine import _run


def _qwen3(bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=bias,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_fused_model_computes_the_same_logits(bias):
    model = _qwen3(bias)
    fused = copy.deepcopy(model)
    aliases = fuse_projections(fused)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LinearSlice) and isinstance(attn.fused_q_k_v, FusedLinear)
    assert isinstance(fused.model.layers[1].mlp.up_proj, LinearSlice)
    # every original weight is a row range of its group's weight, nothing else is renamed
    expect = {"weight"} | ({"bias"} if bias else set())
    assert {n.rsplit(".", 1)[1] for n in aliases if ".q_proj." in n} == expect
    assert len([n for n in aliases if n.endswith(".weight")]) == 2 * 5
    params = dict(fused.named_parameters())
    for name, (group, start, stop) in aliases.items():
        torch.testing.assert_close(params[group][start:stop], dict(model.named_parameters())[name], rtol=0, atol=0)
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in params)
    ids = torch.randint(0, 96, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_slice_called_out_of_order_or_on_another_input_is_still_right():
    torch.manual_seed(1)
    q, k, v = (torch.nn.Linear(8, n) for n in (6, 4, 4))
    holder = torch.nn.Module()
    holder.q_proj, holder.k_proj, holder.v_proj = q, k, v
    fuse_projections(holder)
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    with torch.no_grad():
        got = [holder.v_proj(x), holder.q_proj(y), holder.k_proj(x), holder.q_proj(x), holder.v_proj(y)]
        want = [v(x), q(y), k(x), q(x), v(y)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_a_fused_layer_compiles_as_one_graph():
    """torch.compile(fullgraph=True) fails on a graph break: the shared product must trace as ordinary tensor code."""
    model = _qwen3()
    reference = copy.deepcopy(model)
    fuse_projections(model)
    mlp, ref_mlp = model.model.layers[0].mlp, reference.model.layers[0].mlp
    attn_in = model.model.layers[0].self_attn
    step = torch.compile(lambda h: (attn_in.q_proj(h), attn_in.k_proj(h), attn_in.v_proj(h), mlp(h)), fullgraph=True)
    ra = reference.model.layers[0].self_attn
    with torch.no_grad():
        for rows in (3, 5):
            h = torch.randn(rows, 48)
            for got, want in zip(step(h), (ra.q_proj(h), ra.k_proj(h), ra.v_proj(h), ref_mlp(h)), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_engine_updates_fused_weights_by_their_original_names(tiny_model_path, tmp_path):
    """Weight updates name q_proj/k_proj/... as the trainer does; they land in the fused weight (the engine then
    generates what transformers generates with the new weights), and a whole-model update that leaves one of them
    out is refused naming it."""
    from safetensors.torch import save_file

    engine = PagedEngine(tiny_model_path, dtype="float32", device="cpu", max_running_requests=4)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    try:
        torch.manual_seed(3)
        state = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in reference.named_parameters()}
        (tmp_path / "partial").mkdir()
        partial = {n: t for n, t in state.items() if "layers.1.mlp.up_proj" not in n}
        save_file(partial, tmp_path / "partial/a.safetensors")
        with pytest.raises(ValueError, match=r"1 weights .* missing .*layers\.1\.mlp\.up_proj\.weight"):
            engine.update_weights_from_disk(str(tmp_path / "partial"), None)
        assert engine.update_weights(state.items(), "v1") == len(state)
        reference.load_state_dict(state, strict=False)
        prompt = [5, 9, 17, 3]
        out = _run(engine, [prompt], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))[0]
        ids = torch.tensor([prompt])
        want = reference.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
        assert out.output_ids == want[0, len(prompt) :].tolist()
    finally:
        engine.shutdown()
