"""Checkpoints: a folder per saved rollout, written whole or not at all, and the Hugging Face export.

Layout of `--save DIR`:

    DIR/latest_checkpointed_iteration.txt   the rollout id of the newest complete checkpoint
    DIR/iter_0000007/                       one checkpoint (state after rollout 7 was trained and synced)
        policy/          torch.distributed.checkpoint (DCP) shards: {"model": ..., "optim": ...}
        critic/          the same for the PPO critic
        trainer.pt       LR schedulers, optimizer-step and skipped-step counters
        rng/rank_<r>.pt  every training rank's RNG states
        rollout.json     data position, partial-rollout buffer, rollout id, weight version
        hf_config/       the policy's config and tokenizer, so `slime convert` needs nothing else
        manifest.json    every other file's size and sha256, written last; `verify` checks them before a resume

Every rank writes its DCP shards into `iter_XXXXXXX.incomplete/`; once all parts are in, the folder is renamed to its
final name and only then is the pointer file replaced (write + fsync + rename). A process killed at any moment leaves
the pointer naming a complete checkpoint; a file damaged or removed later is caught by the manifest, and a folder of
checkpoints whose pointer is gone is refused rather than taken for an empty one. DCP shards are resharded on load,
so a checkpoint written by N ranks loads into any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

POINTER = "latest_checkpointed_iteration.txt"
INCOMPLETE = ".incomplete"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded: a file missing, truncated or changed since it was saved."""


def iter_dir(save_dir: str | os.PathLike, rollout_id: int) -> Path:
    return Path(save_dir) / f"iter_{rollout_id:07d}"


def staging_dir(save_dir: str | os.PathLike, rollout_id: int) -> Path:
    """The folder a checkpoint is written into; a leftover one from a killed run is cleared first."""
    path = Path(str(iter_dir(save_dir, rollout_id)) + INCOMPLETE)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def commit(save_dir: str | os.PathLike, rollout_id: int, staged: Path) -> Path:
    """Publish a fully written staging folder as checkpoint `rollout_id` (with its manifest) and point "latest"
    at it."""
    write_manifest(staged)
    final = iter_dir(save_dir, rollout_id)
    if final.exists():  # saving the same rollout again (a resumed run): replace it whole
        old = Path(str(final) + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old)
    else:
        staged.rename(final)
    _fsync_dir(Path(save_dir))
    tmp = Path(save_dir) / (POINTER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(rollout_id))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(save_dir) / POINTER)
    _fsync_dir(Path(save_dir))
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest(load_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """(rollout id, folder) of the newest complete checkpoint under `load_dir`, or None when there is none yet.
    `load_dir` may also be one `iter_XXXXXXX` folder."""
    load_dir = Path(load_dir)
    if (load_dir / "rollout.json").exists():
        return int(json.loads((load_dir / "rollout.json").read_text())["rollout_id"]), load_dir
    pointer = load_dir / POINTER
    if not pointer.exists():
        saved = sorted(p for p in load_dir.glob("iter_*") if (p / "rollout.json").exists())
        if saved:  # starting fresh here would train from scratch and overwrite them
            raise FileNotFoundError(
                f"{pointer} is missing, but {load_dir} holds {len(saved)} checkpoint(s): pass --load {saved[-1]} "
                f"to resume from the newest, or move them away to start fresh"
            )
        return None
    text = pointer.read_text().strip()
    try:
        rollout_id = int(text)
    except ValueError:
        raise ValueError(f"{pointer}: expected a rollout id, found {text[:80]!r}") from None
    folder = iter_dir(load_dir, rollout_id)
    if not (folder / "rollout.json").exists():
        raise FileNotFoundError(f"{pointer} names rollout {rollout_id}, but {folder} is missing or incomplete")
    return rollout_id, folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _digests(paths: list[Path]) -> list[str]:
    """sha256 of each file, in parallel (hashlib frees the GIL while it hashes)."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(_sha256, paths))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """manifest.json: every file of `folder` with its size and sha256."""
    files = _files(folder)
    entries = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": d}
        for p, d in zip(files, _digests(files), strict=True)
    }
    write_json(folder / MANIFEST, {"files": entries})


def verify(folder: str | os.PathLike) -> None:
    """Raise CheckpointError naming the first file of checkpoint `folder` that is missing or differs from its
    manifest entry (size, then sha256). A checkpoint saved before manifests existed is loaded with a warning."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.exists():
        warnings.warn(f"{folder} has no {MANIFEST} (an older version saved it): files unchecked", stacklevel=2)
        return
    entries = json.loads(manifest.read_text())["files"]
    for rel, entry in entries.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {manifest}); this checkpoint cannot be resumed")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, but {entry['bytes']} were saved")
    paths = [folder / rel for rel in entries]
    for path, entry, digest in zip(paths, entries.values(), _digests(paths), strict=True):
        if digest != entry["sha256"]:
            raise CheckpointError(f"{path}: contents changed since it was saved (sha256 differs from {manifest})")


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint folder (or a --save folder holding one) rather than a Hugging Face model."""
    p = Path(path)
    return (p / POINTER).exists() or (p / "rollout.json").exists()


# ---------------------------------------------------------------------------------------------- model and optimizer
def save_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path) -> None:
    """DCP-save an FSDP2 model (and its optimizer unless None). Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from slime.trainer.lora import state_dict_options, trained_entries

    options = state_dict_options(model)  # LoRA: the adapters only, the frozen base is --hf-checkpoint
    if optimizer is None:
        state = {"model": trained_entries(model, get_model_state_dict(model, options=options))}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": trained_entries(model, model_sd), "optim": optim_sd}
    dcp.save(state, checkpoint_id=str(folder))


def saved_keys(folder: Path) -> set[str]:
    """Top-level keys ("model", "optim") present in a DCP folder."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def load_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path) -> bool:
    """Load what `save_model` wrote, resharded to this world size. Collective. Returns whether the optimizer state
    was loaded (False when the checkpoint was saved with --no-save-optim, or `optimizer` is None)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from slime.trainer.lora import state_dict_options, trained_entries

    if not (folder / ".metadata").exists():
        raise FileNotFoundError(f"{folder} holds no model shards (.metadata missing)")
    with_optim = optimizer is not None and "optim" in saved_keys(folder)
    options = state_dict_options(model)
    model_sd, optim_sd = get_state_dict(model, optimizer if with_optim else [], options=options)
    model_sd = trained_entries(model, model_sd)
    state = {"model": model_sd} | ({"optim": optim_sd} if with_optim else {})
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as exc:  # noqa: BLE001 - DCP's own message lists the mismatched keys; say which checkpoint
        raise RuntimeError(f"{folder} does not fit this model (another architecture or size?): {exc}") from exc
    set_state_dict(
        model,
        optimizer if with_optim else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
        options=state_dict_options(model, strict=not options.ignore_frozen_params),
    )
    return with_optim


# ---------------------------------------------------------------------------------------------- small state
def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- Hugging Face
def export_hf(
    model: torch.nn.Module, tokenizer_source: str, out: str | os.PathLike, rank: int, lora: Any = None,
    merged: bool = False,
) -> Path | None:  # fmt: skip
    """Write the policy as a Hugging Face folder (safetensors, config, tokenizer) at `out`, atomically. Collective
    (the full weights are gathered to rank 0, on CPU); returns the folder on rank 0, None elsewhere. With LoRA
    (`lora`: its LoraSpec) `out` is a PEFT adapter folder over `tokenizer_source` (the base model), and with
    `merged` the merged model goes to `out/merged` too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from slime.trainer.lora import adapter_parameters, merged_parameters

    if lora is None:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return write_hf_folder(model, full, tokenizer_source, Path(out)) if rank == 0 else None
    adapters = {name: t.cpu() for name, t in adapter_parameters(model)}
    full = {name: t.cpu() for name, t in merged_parameters(model)} if merged else None
    if rank != 0:
        return None
    write_adapter_folder(adapters, lora, tokenizer_source, Path(out))
    if full is not None:
        write_hf_folder(model, full, tokenizer_source, Path(out) / "merged")
    return Path(out)


def write_adapter_folder(adapters: dict[str, torch.Tensor], spec: Any, base: str, out: Path) -> Path:
    """A PEFT adapter folder (adapter_config.json, adapter_model.safetensors) that `PeftModel.from_pretrained(base
    model, out)` loads."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    staged = Path(str(out) + INCOMPLETE)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
        base_model_name_or_path=str(base), task_type="CAUSAL_LM",
    )  # fmt: skip
    config.save_pretrained(staged)
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in adapters.items()}, staged / "adapter_model.safetensors"
    )
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    return out


def write_hf_folder(model: torch.nn.Module, state: dict[str, torch.Tensor], tokenizer_source: str, out: Path) -> Path:
    from transformers import AutoTokenizer

    staged = Path(str(out) + INCOMPLETE)
    shutil.rmtree(staged, ignore_errors=True)
    staged.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staged, state_dict=state, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(staged)
    generation = Path(tokenizer_source) / "generation_config.json"
    if generation.exists() and not (staged / "generation_config.json").exists():
        shutil.copy(generation, staged)
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    return out


def convert(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """`slime convert`: a checkpoint (a --save folder or one iter_ folder) -> a Hugging Face folder. Runs in one
    process without torch.distributed; the checkpoint's hf_config/ supplies the architecture and tokenizer."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    found = latest(checkpoint)
    if found is None:
        raise FileNotFoundError(f"{checkpoint}: no {POINTER} and no rollout.json: not a slime checkpoint")
    folder = found[1]
    config_dir = folder / "hf_config"
    if not (config_dir / "config.json").exists():
        raise FileNotFoundError(f"{config_dir}/config.json is missing; the checkpoint cannot be converted")
    if (folder / "lora.json").exists():
        return _convert_lora(folder, Path(out))
    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # loading without a process group is the point here, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder / "policy"))
    model.load_state_dict(state["model"])
    model.tie_weights()
    return write_hf_folder(model, state["model"], str(config_dir), Path(out))


def _convert_lora(folder: Path, out: Path) -> Path:
    """A LoRA checkpoint: the PEFT adapter folder at `out` and the merged model at `out/merged`. The base model is
    the one the run trained on (lora.json names it); it must still be there."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from slime.trainer.lora import LoraSpec, adapter_parameters, add_adapters, merged_parameters

    saved = json.loads((folder / "lora.json").read_text())
    base = saved.pop("base_model")
    if not Path(base, "config.json").exists():
        raise FileNotFoundError(f"{folder}: its LoRA adapters sit on {base}, which holds no config.json any more")
    targets = saved["target_modules"]
    spec = LoraSpec(
        saved["rank"], saved["alpha"], saved["dropout"], targets if isinstance(targets, str) else tuple(targets)
    )
    model = add_adapters(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), spec)
    state = {"model": {k: v for k, v in model.state_dict().items() if ".lora_" in k}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder / "policy"))
    model.load_state_dict(state["model"], strict=False)
    write_adapter_folder(dict(adapter_parameters(model)), spec, base, out)
    write_hf_folder(model, dict(merged_parameters(model)), str(folder / "hf_config"), out / "merged")
    return out
