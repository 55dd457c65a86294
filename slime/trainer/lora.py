"""LoRA: low-rank adapters trained on a frozen policy (`--lora-rank`).

PEFT's LoRA layers are injected into the Hugging Face model in place (`peft.inject_adapter_in_model`), so the model
keeps its class and parameter names, with each adapted linear layer `X` split into `X.base_layer.weight` (frozen)
and `X.lora_A.default.weight` [r, in], `X.lora_B.default.weight` [out, r] (trained; B starts at zero, so step 0 is
the base model). The layer computes base(x) + scaling · B(A(dropout(x))), scaling = alpha / r.

What the rest of the trainer needs from it:
- `merged_parameters`: the weights an engine serves, in the base model's names, W + scaling · B @ A;
- `adapters_disabled`: the base model itself, the KL reference without a second copy of the weights;
- `state_dict_options`: checkpoints hold the adapters and their optimizer state only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from slime.sync.buckets import full_tensor

ADAPTER = "default"  # PEFT's name of the one adapter


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | str  # module-name suffixes, or "all-linear"

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lora_spec(args: Any) -> LoraSpec | None:
    """The LoRA settings of the flags; None without --lora-rank (full fine-tuning)."""
    if not getattr(args, "lora_rank", 0):
        return None
    targets = args.lora_target_modules
    target = "all-linear" if targets == ["all-linear"] else tuple(targets)
    return LoraSpec(args.lora_rank, float(args.lora_alpha), float(args.lora_dropout), target)


def add_adapters(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """Inject LoRA layers (float32, like the master weights) into `model` and freeze everything else. Raises
    ValueError naming --lora-target-modules when no module matches."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    try:
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as exc:  # PEFT: "Target modules ... not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"--lora-target-modules {targets}: {exc} (linear layers here: {names})") from exc
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def has_adapters(model: torch.nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` computing as the base model (every LoRA layer passes its input to the frozen layer alone)."""
    layers = list(_lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every weight an engine serves, in the base model's names: adapted layers' weights
    merged (W + scaling · B @ A, computed in float32), the rest as they are. Collective under FSDP2 (full_tensor):
    every rank iterates in the same order."""
    layers = _lora_layers(model)
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if ".base_layer." not in name:
            yield name, full_tensor(param).detach()
            continue
        owner, leaf = name.rsplit(".base_layer.", 1)
        tensor = full_tensor(param).detach()
        if leaf == "weight":
            layer = layers[owner]
            a = full_tensor(layer.lora_A[ADAPTER].weight).detach().float()
            b = full_tensor(layer.lora_B[ADAPTER].weight).detach().float()
            tensor = (tensor.float() + layer.scaling[ADAPTER] * (b @ a)).to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor


def adapter_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of the adapters alone, in PEFT's saved-adapter names (`….lora_A.weight`)."""
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            yield name.replace(f".{ADAPTER}.", "."), full_tensor(param).detach()


def sync_adapters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapters as an engine applies them (`--lora-sync adapters`): `X.lora_A.weight` [r, in] and
    `X.lora_B.weight` [out, r] already multiplied by the scaling, so the engine serves W_X + B @ A (W_X: the weight
    it held before its first adapter update). Megabytes instead of the model."""
    layers = _lora_layers(model)
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            owner = name.split(".lora_A.")[0]
            yield f"{owner}.lora_A.weight", full_tensor(param).detach()
        elif ".lora_B." in name:
            owner = name.split(".lora_B.")[0]
            yield f"{owner}.lora_B.weight", full_tensor(param).detach() * layers[owner].scaling[ADAPTER]


def served_parameters(model: torch.nn.Module, adapters_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """What a weight sync sends: an adapted model's merged weights (or, `adapters_only`, its scaled adapters),
    else every parameter in full."""
    if has_adapters(model):
        yield from sync_adapters(model) if adapters_only else merged_parameters(model)
    else:
        for name, param in model.named_parameters():
            yield name, full_tensor(param).detach()


def state_dict_options(model: torch.nn.Module, **extra: Any) -> Any:
    """DCP state-dict options: an adapted model's frozen base stays out of checkpoints (it is --hf-checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=has_adapters(model), **extra)


def trained_entries(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`state` (a model state dict) without the frozen base's entries of an adapted model. ignore_frozen_params
    alone keeps a tied output layer (it is no parameter of its own), as large as the embedding."""
    if not has_adapters(model):
        return state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


SPEC_FILE = "lora.json"


def write_spec(folder: Path, spec: LoraSpec, base: str) -> None:
    """Record in a checkpoint which adapters it holds and on which base model."""
    (folder / SPEC_FILE).write_text(json.dumps({"base_model": base, **asdict(spec)}, indent=1))


def check_spec(folder: Path, spec: LoraSpec | None) -> None:
    """Refuse a checkpoint whose adapters (or their absence) do not match the flags, naming both."""
    saved = json.loads((folder / SPEC_FILE).read_text()) if (folder / SPEC_FILE).exists() else None
    if saved is None and spec is None:
        return
    if saved is None:
        raise ValueError(f"{folder} holds a fully fine-tuned model, not LoRA adapters: drop --lora-rank to resume it")
    if spec is None:
        raise ValueError(f"{folder} holds LoRA adapters (rank {saved['rank']}): resume with the same --lora-* flags")
    saved_targets = saved["target_modules"]
    saved_targets = saved_targets if isinstance(saved_targets, str) else tuple(saved_targets)
    if (saved["rank"], saved["alpha"], saved_targets) != (spec.rank, spec.alpha, spec.target_modules):
        raise ValueError(
            f"{folder} holds LoRA adapters rank {saved['rank']}, alpha {saved['alpha']}, targets {saved_targets}; "
            f"the flags ask for rank {spec.rank}, alpha {spec.alpha}, targets {spec.target_modules}"
        )
