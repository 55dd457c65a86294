from pathlib import Path

import pytest

from slime.hub import provision


@pytest.fixture
def fake_builtin(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(provision.BUILTIN_MODELS, "Fake-1M", provision.BuiltinModel("fake-pkg", "fake.gguf"))
    monkeypatch.setattr(provision, "_locate_gguf", lambda model: tmp_path / "fake.gguf")
    return tmp_path / "cache" / "models" / "Fake-1M"


def test_failed_conversion_leaves_nothing_usable(fake_builtin, monkeypatch):
    def half_write(gguf, out: Path):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(provision, "convert_gguf", half_write)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        provision.resolve_checkpoint("Fake-1M")
    assert not fake_builtin.exists()
    assert not list(fake_builtin.parent.glob(".Fake-1M.tmp-*"))  # the partial folder was cleaned up


def test_incomplete_folder_is_rebuilt_and_result_cached(fake_builtin, monkeypatch):
    fake_builtin.mkdir(parents=True)
    (fake_builtin / "config.json").write_text("stale, no completion marker")
    calls = []

    def convert(gguf, out: Path):
        calls.append(out)
        (out / "config.json").write_text('{"ok": true}')

    monkeypatch.setattr(provision, "convert_gguf", convert)
    path = provision.resolve_checkpoint("Fake-1M")
    assert Path(path, "config.json").read_text() == '{"ok": true}'
    assert provision.resolve_checkpoint("Fake-1M") == path and len(calls) == 1


def test_bad_paths_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--hf-checkpoint.*built-in: SmolLM2-135M-Instruct"):
        provision.resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        provision.resolve_checkpoint(str(tmp_path))


def test_embedded_model_is_a_loadable_hf_folder(smollm2_path):
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(smollm2_path).model_type == "llama"
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    assert list(Path(smollm2_path).glob("*.safetensors"))
