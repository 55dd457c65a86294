"""Every engine server option, defined once.

The same table builds the server's own parser (`slime-serve --help`), the trainer's `--sglang-*` /
`--rollout-engine-*` flags that set those options for the engines a run launches, and the command line a launcher
passes to each engine. An option without a `train_flag` is the launcher's business (port, device, seed per engine).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineOption:
    name: str  # attribute name on the server's args; its flag is --name-with-dashes
    help: str
    default: Any = None  # the server's default; a run settles its own value (slime.config.engine)
    type: type | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a store_true flag
    train_flag: str | None = None  # the trainer's flag for this option; None: set by the launcher only
    train_help: str = ""  # what the trainer's default is, when it differs from the server's
    aliases: tuple[str, ...] = ()  # other spellings the server accepts
    sglang: str | None = None  # SGLang's launch_server flag for this option (the server accepts it too)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def train_dest(self) -> str | None:
        return self.train_flag.removeprefix("--").replace("-", "_") if self.train_flag else None


BACKENDS = ("auto", "paged", "padded")
ENGINE_OPTIONS: tuple[EngineOption, ...] = (
    EngineOption(
        "model_path", "Hugging Face folder or built-in model name (e.g. SmolLM2-135M-Instruct)", sglang="--model-path"
    ),
    EngineOption("host", "interface to bind", "127.0.0.1", sglang="--host"),
    EngineOption("port", "TCP port to bind", 30000, int, sglang="--port"),
    EngineOption(
        "listen_fd",
        "serve on this listening socket inherited from the launcher instead of binding --host/--port: the launcher "
        "binds port 0 itself, so no other process can take the port between its choice and the bind (-1: bind --port)",
        -1,
        int,
    ),
    EngineOption("device", "where the model runs: cpu, cuda or cuda:N", "cpu", sglang="--device"),
    EngineOption(
        "seed", "seed of the sampling generator (a run gives engine i --seed + i)", 0, int, sglang="--random-seed"
    ),
    EngineOption(
        "max_request_mb",
        "largest /generate body accepted, in MiB; a larger one gets 413 before it is read (weight updates are not "
        "limited by it)",
        64,
        int,
    ),
    EngineOption(
        "parent_pid",
        "exit when this process (the launcher) is gone, so a killed run leaves no orphan engine (0: never)",
        0,
        int,
    ),
    EngineOption(
        "dtype",
        "engine weights and compute",
        "float32",
        choices=("float32", "bfloat16", "float16"),
        train_flag="--rollout-engine-dtype",
        train_help="default: bfloat16 on GPU, float32 on CPU",
        sglang="--dtype",
    ),
    EngineOption(
        "num_threads",
        "torch CPU threads of the engine (0: torch's default)",
        0,
        int,
        train_flag="--rollout-engine-threads",
        train_help="default: the cores divided by the engines",
    ),
    EngineOption(
        "backend",
        "paged: block-paged KV cache, prefix sharing, CUDA-graph decode; padded: one padded transformers "
        "DynamicCache (any model, including sliding-window, soft-capped or other non-full attention); auto: paged "
        "where it can serve the model (checked at start), else padded with a warning saying why",
        "auto",
        choices=BACKENDS,
        train_flag="--rollout-engine-backend",
    ),
    EngineOption(
        "max_running_requests",
        "requests one engine decodes together (batch rows)",
        64,
        int,
        train_flag="--sglang-max-running-requests",
        train_help="default 512 on GPU (42.3k vs 33.4k tok/s at 256 on an H200), 256 on CPU (221 vs 160 tok/s at 64 on "
        "2 cores, docs/benchmarks.md); 1 with --sglang-enable-deterministic-inference",
        sglang="--max-running-requests",
    ),
    EngineOption(
        "chunked_prefill_size",
        "prompt tokens of one request computed per prefill pass; longer prompts are prefilled in chunks (0: 4096 on "
        "CPU, 8192 on GPU)",
        0,
        int,
        train_flag="--sglang-chunked-prefill-size",
        sglang="--chunked-prefill-size",
    ),
    EngineOption(
        "max_prefill_tokens",
        "prompt tokens one prefill pass computes over all its requests (0: the chunk size on CPU, four times it on "
        "GPU, where a pass of many short prompts costs the host more than the GPU)",
        0,
        int,
        train_flag="--sglang-max-prefill-tokens",
        sglang="--max-prefill-tokens",
    ),
    EngineOption(
        "tp_size",
        "tensor-parallel size (SGLang's --tp); the embedded engine runs on one device, so only 1",
        1,
        int,
        choices=(1,),
        aliases=("--tp",),
        sglang="--tp-size",
    ),
    EngineOption(
        "page_size",
        "paged backend: tokens per KV cache block",
        16,
        int,
        train_flag="--sglang-page-size",
        sglang="--page-size",
    ),
    EngineOption(
        "kv_cache_tokens",
        "paged backend: KV cache size in tokens (0: from --mem-fraction-static on GPU, 2048 per request row on CPU)",
        0,
        int,
        sglang="--max-total-tokens",
    ),
    EngineOption(
        "mem_fraction_static",
        "paged backend on GPU: fraction of the GPU's memory the engine holds for weights and KV cache",
        0.85,
        float,
        train_flag="--sglang-mem-fraction-static",
        train_help="default: 0.85 on GPUs of its own, 0.6 colocated, 0.35 beside a resident trainer",
        sglang="--mem-fraction-static",
    ),
    EngineOption(
        "disable_cuda_graph",
        "paged backend: run decode steps eagerly",
        switch=True,
        train_flag="--sglang-disable-cuda-graph",
        sglang="--disable-cuda-graph",
    ),
    EngineOption(
        "disable_radix_cache",
        "paged backend: no prefix cache (every request computes its whole prompt, even the n samples of one prompt)",
        switch=True,
        train_flag="--sglang-disable-radix-cache",
        sglang="--disable-radix-cache",
    ),
    EngineOption(
        "disable_torch_compile",
        "paged backend on GPU: do not torch.compile the model's decoder layers (starts faster, decodes slower)",
        switch=True,
        train_flag="--sglang-disable-torch-compile",
    ),
    EngineOption(
        "cuda_graph_max_bs",
        "paged backend: largest batch a decode graph is captured for",
        512,
        int,
        train_flag="--sglang-cuda-graph-max-bs",
        sglang="--cuda-graph-max-bs",
    ),
    EngineOption(
        "num_continuous_decode_steps",
        "paged backend: decode steps run back to back while every request samples inside the step and nobody waits "
        "to join, each launched before the host reads the previous one's tokens (0: 8 on GPU, 1 on CPU)",
        0,
        int,
        train_flag="--sglang-num-continuous-decode-steps",
        sglang="--num-continuous-decode-steps",
    ),
    EngineOption(
        "enable_memory_saver",
        "keep weights and KV cache releasable (SGLang needs it for /release_memory_occupation; the embedded engine "
        "always can, so it accepts the flag and ignores it); the launcher sets it when the run releases engine memory",
        switch=True,
        sglang="--enable-memory-saver",
    ),
    EngineOption(
        "skip_server_warmup",
        "serve without a warm-up request at start (SGLang's flag; the embedded engine has no warm-up and ignores it)",
        switch=True,
        sglang="--skip-server-warmup",
    ),
)
OPTIONS_BY_NAME = {o.name: o for o in ENGINE_OPTIONS}
# 0 means "choose for me" for these; SGLang has its own choice, so 0 is not passed on
_AUTO_WHEN_ZERO = {"chunked_prefill_size", "max_prefill_tokens", "kv_cache_tokens"}


def prefill_sizes(on_gpu: bool, chunked_prefill_size: int | None, max_prefill_tokens: int | None) -> tuple[int, int]:
    """(chunked_prefill_size, max_prefill_tokens) with unset (0 or None) ones chosen: one request's share of a pass
    8192 tokens on GPU, 4096 on CPU; a pass four shares on GPU (there a pass of many short prompts costs the host more
    than the GPU, ~35 ms of launches), one on CPU."""
    chunk = chunked_prefill_size or (8192 if on_gpu else 4096)
    return chunk, max_prefill_tokens or chunk * (4 if on_gpu else 1)


def _add(group: Any, flag: str | list[str], option: EngineOption, default: Any, help_text: str) -> None:
    flags = [flag] if isinstance(flag, str) else flag
    if option.switch:
        group.add_argument(*flags, action="store_true", help=help_text)
    else:
        group.add_argument(*flags, type=option.type, default=default, choices=option.choices, help=help_text)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine server's own flags (`python -m slime.engine.server`)."""
    for o in ENGINE_OPTIONS:
        if o.name == "model_path":
            parser.add_argument(o.flag, required=True, help=o.help)
        else:
            spellings = [o.flag, *o.aliases, *([o.sglang] if o.sglang and o.sglang not in (o.flag, *o.aliases) else [])]
            _add(parser, spellings, o, o.default, o.help)


def add_train_arguments(group: Any) -> None:
    """The trainer's flags for the engines it launches; unset ones are settled per placement (None until then)."""
    for o in ENGINE_OPTIONS:
        if o.train_flag:
            note = o.train_help or (f"default {o.default}" if not o.switch else "")
            _add(group, o.train_flag, o, None, f"{o.help} ({note})" if note else o.help)


def train_values(args: Any) -> dict[str, Any]:
    """{option name: the run's value} for every option a run sets from its flags."""
    return {o.name: getattr(args, o.train_dest) for o in ENGINE_OPTIONS if o.train_flag}


def command_flags(values: dict[str, Any], sglang: bool = False) -> list[str]:
    """The server command-line flags for `values` ({option name: value}); None and false switches are left out
    (the server's default applies). `sglang`: SGLang's launch_server flags instead, in its spelling, for the options
    SGLang has (the embedded engine's own, such as threads or its backend, are left out), and without the zeros
    that mean "choose for me" (SGLang chooses). An unknown name is a TypeError naming it."""
    unknown = sorted(set(values) - set(OPTIONS_BY_NAME))
    if unknown:
        raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(OPTIONS_BY_NAME)}")
    flags: list[str] = []
    for name, value in values.items():
        option = OPTIONS_BY_NAME[name]
        flag = option.sglang if sglang else option.flag
        if flag is None or value is None or (sglang and name in _AUTO_WHEN_ZERO and value == 0):
            continue
        if option.switch:
            flags += [flag] if value else []
        else:
            flags += [flag, str(value)]
    return flags
