"""The trained and frozen models of a training rank: Hugging Face definitions, sharded with FSDP2."""

from __future__ import annotations

import torch

from slime.trainer.attention import implementation_for
from slime.trainer.lora import LoraSpec, add_adapters


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local tensor (the object owning the storage), else `t`."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def compute_dtype(device: torch.device, choice: str = "auto") -> torch.dtype:
    """--train-compute-dtype resolved for `device`: auto is bfloat16 on GPU and float32 on CPU."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice)


def shard(model: torch.nn.Module, layer_classes: set[str], mesh, dtype: torch.dtype) -> torch.nn.Module:
    """FSDP2 `fully_shard` on every decoder layer, then on the root; a `dtype` other than float32 is the compute
    dtype of the forward and backward (float32 master weights, gradients reduced in float32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def attention_for(path: str) -> str:
    """The attention implementation the trainer loads `path` with: packed (per-sample, no dense mask) where the
    model's attention allows it (slime.trainer.attention)."""
    from transformers import AutoConfig

    return implementation_for(AutoConfig.from_pretrained(path))


def dropout_overrides(path: str, attention: float | None, hidden: float | None) -> dict[str, float]:
    """Config keys that set the model's dropout to --attention-dropout / --hidden-dropout. A nonzero value for a
    model without that dropout is refused naming the flag (a zero one means the same as its absence)."""
    from transformers import AutoConfig

    config, out = AutoConfig.from_pretrained(path), {}
    for flag, value, keys in (
        ("--attention-dropout", attention, ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")),
        ("--hidden-dropout", hidden, ("hidden_dropout", "resid_pdrop", "hidden_dropout_prob")),
    ):
        if value is None:
            continue
        present = [k for k in keys if hasattr(config, k)]
        if not present and value > 0:
            raise ValueError(f"{flag} {value}: {config.model_type} models have no such dropout ({path})")
        out |= {k: value for k in present}
    return out


def checkpoint_layers(model: torch.nn.Module, layer_classes: set[str], which: str | int) -> int:
    """Activation checkpointing (`--recompute-granularity full`): decoder layers keep no activations in forward and
    are recomputed in backward; `which` is "all" or the number of leading layers (`--recompute-method block`).
    Returns how many layers recompute. Uses transformers' own per-layer switch, which checkpoints `forward` (FSDP2's
    hooks stay outside) and leaves parameter names unchanged, so weight sync and checkpoints see the same names."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes and hasattr(m, "gradient_checkpointing")]
    if not layers:
        raise ValueError(f"--recompute-granularity full: no checkpointable decoder layers in {type(model).__name__}")
    keep = len(layers) if which == "all" else int(which)
    for layer in layers[keep:]:
        layer.gradient_checkpointing = False
    return min(keep, len(layers))


def load_policy(
    path: str,
    device: torch.device,
    mesh,
    trainable: bool,
    checkpointing: str | int | None = None,
    overrides: dict | None = None,
    dtype: torch.dtype | None = None,
    lora: LoraSpec | None = None,
) -> torch.nn.Module:
    """A causal LM with fp32 weights (the policy, or a frozen reference / teacher) computing in `dtype` (default:
    `compute_dtype(device)`); `overrides`: config values (dropout), `checkpointing`: see `checkpoint_layers`
    (trained models only); `lora`: LoRA adapters injected before sharding, the rest frozen (slime.trainer.lora).
    On a 2-D ("dp", "tp") mesh the model is first split by its own tensor-parallel plan over "tp" (transformers'
    `tp_plan`), then FSDP2-sharded over "dp"."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, attn_implementation=attention_for(path), **(overrides or {}))
    tensor_parallel = mesh.ndim == 2
    if tensor_parallel:
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", device_mesh=mesh["tp"], **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    if lora is not None:
        model = add_adapters(model, lora)
    if trainable and checkpointing:
        checkpoint_layers(model, layer_classes, checkpointing)
    model = shard(model, layer_classes, mesh["dp"] if tensor_parallel else mesh, dtype or compute_dtype(device))
    if not trainable:
        model.eval().requires_grad_(False)
    return model


class ValueModel(torch.nn.Module):
    """The critic: a transformer backbone and a linear value head, V(s) at every position of a packed row."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = torch.nn.Linear(backbone.config.hidden_size, 1)
        # V = 0 at the start: GAE begins as REINFORCE with returns and the head learns before it steers anything
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """input_ids, position_ids: [1, T] -> values [1, T]; kwargs go to the backbone (packed attention)."""
        hidden = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
        hidden = hidden.last_hidden_state
        return self.value_head(hidden).sum(-1)  # not squeeze: FSDP warns that in-place ops on a view skip hooks


def load_critic(path: str, device: torch.device, mesh, dtype: torch.dtype | None = None) -> ValueModel:
    """The critic, its backbone initialised from the causal LM at `path` (the LM head is not used), computing in
    `dtype` as `load_policy`."""
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation=attention_for(path))
    critic = ValueModel(backbone).to(device)
    layers = set(getattr(backbone, "_no_split_modules", None) or [])
    critic = shard(critic, layers, mesh, dtype or compute_dtype(device))
    critic.train()
    return critic


@torch.no_grad()
def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst's parameters := src's, shard by shard (both loaded the same way, e.g. policy and reference)."""
    target = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        q = target[name]
        local_shard(q).copy_(local_shard(p))


def total_norm(tensors: list[torch.Tensor]) -> float:
    """The 2-norm of all `tensors` together in float64, each element counted once however it is sharded: a DTensor's
    sum of squares is partial over the mesh dimensions it is sharded on and replicated over the others, so sums are
    added up per (mesh, placements) (FSDP2 alone, or tensor-parallel and FSDP2 layers on different meshes) and each
    group is reduced once over its own mesh."""
    groups: dict = {}
    for t in tensors:
        square = t.detach().to(torch.float64).square().sum()
        key = (getattr(square, "device_mesh", None), getattr(square, "placements", None))
        groups[key] = groups[key] + square if key in groups else square
    total = 0.0
    for square in groups.values():
        total += float(square.full_tensor() if hasattr(square, "full_tensor") else square)
    return total**0.5


def compile_pointwise(model: torch.nn.Module) -> int:
    """torch.compile the parts of every decoder layer that are chains of element-wise work around a few matmuls:
    the normalisation layers, the MLP and the rotary embedding, so each runs as one or two fused kernels forward
    and backward instead of five to ten. Attention stays eager (packed, variable-length: a graph break).
    The rotary function is replaced in the model's transformers module, for every model of that family in this
    process. Returns how many modules and functions were compiled."""
    import sys

    count = 0
    for m in model.modules():
        if type(m).__name__.endswith(("RMSNorm", "MLP")):
            m.compile(dynamic=True)
            count += 1
    # the model's own modeling module (FSDP2 wraps the class in a subclass defined elsewhere)
    owner = next((c.__module__ for c in type(model).__mro__ if c.__module__.startswith("transformers.models.")), "")
    family = sys.modules.get(owner)
    rotary = getattr(family, "apply_rotary_pos_emb", None)
    if rotary is not None and not hasattr(rotary, "_torchdynamo_orig_callable"):
        family.apply_rotary_pos_emb = torch.compile(rotary, dynamic=True)
        count += 1
    return count
