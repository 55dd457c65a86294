import contextlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded model, provisioned through the product's own code (converted once into the user cache)."""
    from slime.hub.provision import resolve_checkpoint

    return resolve_checkpoint("SmolLM2-135M-Instruct")


def build_tiny_llama(tokenizer_dir: str, out: str, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> str:
    """Save a random-weight Llama with the tokenizer from `tokenizer_dir` into `out`: fast, but a real transformers
    model. The embedding is scaled up so the output distribution is peaked: sampled text has structure and
    log-probs vary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_path(smollm2_path, tmp_path_factory) -> str:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer."""
    return build_tiny_llama(smollm2_path, str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_teacher_path(smollm2_path, tmp_path_factory) -> str:
    """Another tiny Llama (other random weights, same tokenizer): a distillation teacher that disagrees."""
    return build_tiny_llama(smollm2_path, str(tmp_path_factory.mktemp("tiny-teacher")), seed=1)


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        with open(path, "w") as f:
            for r in rows:
                f.write(r if isinstance(r, str) else json.dumps(r))
                f.write("\n")
        return str(path)

    return write


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (slime.train.train reuses it and leaves it running): starting
    and stopping one per module cost ~5 s each."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True, scope="session")
def _quiet_ray():
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    yield


@contextlib.contextmanager
def engines_behind_router(model_path: str, logs, count: int = 1, num_threads: int = 1, ready_s: float = 120):
    """Real engine servers registered with the real router; yields (router, engines), stops them all after."""
    from slime.engine.launch import launch_engine
    from slime.router.router import launch_router, register_worker

    engines = [launch_engine(model_path, logs, index=i, num_threads=num_threads, wait=False) for i in range(count)]
    router = launch_router(logs)
    try:
        for e in engines:
            e.wait_ready("/health", ready_s)
            register_worker(router.url, e.url)
        yield router, engines
    finally:
        for s in [*engines, router]:
            s.stop()


def router_flags(router_url: str) -> list[str]:
    """slime's flags that point a run at an already running router."""
    host, port = router_url.rsplit("//", 1)[1].split(":")
    return ["--sglang-router-ip", host, "--sglang-router-port", port]
