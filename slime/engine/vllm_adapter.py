"""The SGLang protocol in front of a vLLM server (--rollout-backend vllm).

The router, the rollout client and the weight syncer talk to this process exactly as to the embedded engine; it
starts vLLM's OpenAI-compatible server (with its RL endpoints, VLLM_SERVER_DEV_MODE=1) on a Unix socket of its own
and translates each call:

    /generate                  -> /v1/completions: prompt as token ids, token ids and the sampled tokens' log-probs
                                  back; log-probs after temperature (vLLM runs with --logprobs-mode processed_logprobs,
                                  SGLang's and the trainer's convention)
    /abort_request             -> /abort_requests (all)
    /pause_generation          -> /pause (abort -> abort, in_place -> keep)
    /continue_generation       -> /resume
    /flush_cache               -> /reset_prefix_cache
    /update_weights_from_disk  -> /collective_rpc slime_load_weights(folder) (slime.engine.vllm_worker, the model's own
                                  load_weights in place), then /reset_prefix_cache
    /update_weight_version     -> /update_weight_version
    /health                    -> /health

What is not wired to vLLM here (tensor and distributed weight updates, memory release) answers 400 naming what to
use instead; the configuration refuses those flags before a run starts (slime.config.cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import aiohttp
from aiohttp import web

logger = logging.getLogger("slime.engine.vllm_adapter")
UPSTREAM = web.AppKey("upstream", dict)

# SGLang sampling field -> vLLM completions field
SAMPLING = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "min_new_tokens": "min_tokens",
    "skip_special_tokens": "skip_special_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
    "no_stop_trim": "include_stop_str_in_output",
    "sampling_seed": "seed",
    "repetition_penalty": "repetition_penalty",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
}


def completion_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The vLLM /v1/completions body for an SGLang /generate body. A field vLLM cannot honour is a ValueError naming
    it (answered 400), never dropped."""
    params = dict(body.get("sampling_params") or {})
    if body.get("input_ids") is None:
        raise ValueError("the vllm backend takes input_ids (token ids), not text")
    ids = body["input_ids"]
    if not isinstance(ids, list) or not ids or isinstance(ids[0], list):
        raise ValueError("input_ids must be one non-empty list of token ids (batches are sent as separate requests)")
    unknown = sorted(set(params) - set(SAMPLING))
    if unknown:
        raise ValueError(f"sampling_params {unknown} are not supported by the vllm backend")
    req = {SAMPLING[k]: v for k, v in params.items() if v is not None}
    req.setdefault("max_tokens", 128)
    if req.get("top_k", 1) <= 0:  # SGLang's "no top-k" values; vLLM's default is the same
        del req["top_k"]
    req |= {"model": model, "prompt": ids, "logprobs": 0, "return_token_ids": True, "stream": False, "n": 1}
    return req


def generate_response(out: dict[str, Any], prompt_len: int, version: str) -> dict[str, Any]:
    """SGLang's /generate answer for a vLLM completion."""
    choice = out["choices"][0]
    ids = [int(t) for t in choice.get("token_ids") or []]
    lps = [float(x) for x in ((choice.get("logprobs") or {}).get("token_logprobs") or [])]
    if len(lps) != len(ids):
        raise ValueError(f"vLLM answered {len(ids)} token ids but {len(lps)} log-probs")
    reason = choice.get("finish_reason") or "abort"
    if reason == "stop":
        matched = choice.get("stop_reason")
        finish = {"type": "stop", "matched": matched if matched is not None else (ids[-1] if ids else None)}
    elif reason == "length":
        finish = {"type": "length", "length": len(ids)}
    else:
        finish = {"type": "abort", "message": f"vLLM finish reason {reason}"}
    meta = {
        "id": out.get("id", ""),
        "finish_reason": finish,
        "prompt_tokens": prompt_len,
        "completion_tokens": len(ids),
        "cached_tokens": 0,
        "weight_version": version,
        "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids, strict=True)],
        "output_token_logprobs_length": len(ids),
        "input_token_logprobs": [],
    }
    return {"text": choice.get("text", ""), "output_ids": ids, "meta_info": meta}


async def _upstream(request: web.Request, method: str, path: str, payload: Any = None, timeout: float = 3600) -> Any:
    up = request.app[UPSTREAM]
    async with up["session"].request(
        method, f"http://vllm{path}", json=payload, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as resp:
        text = await resp.text()
        if resp.status != 200:
            message = {"error": {"message": f"vLLM {path} answered {resp.status}: {text[:500]}"}}
            raise web.HTTPBadGateway(text=json.dumps(message), content_type="application/json")
        return await resp.json(content_type=None) if text else {}


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def generate(request: web.Request) -> web.Response:
    up = request.app[UPSTREAM]
    body = await request.json()
    try:
        req = completion_request(body, up["model"])
    except ValueError as exc:
        return _error(str(exc))
    out = await _upstream(request, "POST", "/v1/completions", req)
    return web.json_response(generate_response(out, len(req["prompt"]), up["version"]))


async def health(request: web.Request) -> web.Response:
    up = request.app[UPSTREAM]
    if up["proc"].poll() is not None:
        return _error(f"vLLM exited with code {up['proc'].returncode}", 503)
    try:
        await _upstream(request, "GET", "/health", timeout=10)
    except (TimeoutError, aiohttp.ClientError, web.HTTPException):
        return _error("vLLM is not serving yet", 503)
    return web.json_response({})


async def server_info(request: web.Request) -> web.Response:
    up = request.app[UPSTREAM]
    return web.json_response({"backend": "vllm", "device": up["device"], "weight_version": up["version"]})


async def model_info(request: web.Request) -> web.Response:
    up = request.app[UPSTREAM]
    return web.json_response({"model_path": up["model"], "weight_version": up["version"], "backend": "vllm"})


async def get_weight_version(request: web.Request) -> web.Response:
    return web.json_response({"weight_version": request.app[UPSTREAM]["version"]})


async def abort_request(request: web.Request) -> web.Response:
    await _upstream(request, "POST", "/abort_requests", {})
    return web.json_response({})


async def pause_generation(request: web.Request) -> web.Response:
    body = await _json(request)
    mode = {"abort": "abort", "in_place": "keep", "retract": "abort"}.get(body.get("mode", "abort"))
    if mode is None:
        return _error(f"pause mode {body.get('mode')!r}: abort or in_place")
    await _upstream(request, "POST", f"/pause?mode={mode}")
    return web.json_response({})


async def continue_generation(request: web.Request) -> web.Response:
    await _upstream(request, "POST", "/resume")
    return web.json_response({})


async def flush_cache(request: web.Request) -> web.Response:
    await _upstream(request, "POST", "/reset_prefix_cache")
    return web.json_response({})


async def update_weights_from_disk(request: web.Request) -> web.Response:
    body = await _json(request)
    if not body.get("model_path"):
        return web.json_response({"success": False, "message": "model_path is required"}, status=400)
    if body.get("partial"):
        return web.json_response(
            {"success": False, "message": "partial updates (LoRA adapters) are not supported by the vllm backend"},
            status=400,
        )
    rpc = {"method": "slime_load_weights", "args": [body["model_path"]]}
    await _upstream(request, "POST", "/collective_rpc", rpc)
    # cached prefixes hold the old weights' KV: no new request may reuse them (as the embedded engine forgets them)
    await _upstream(request, "POST", "/reset_prefix_cache")
    await _set_version(request, body.get("weight_version"))
    return web.json_response({"success": True, "message": f"reloaded from {body['model_path']}"})


async def update_weight_version(request: web.Request) -> web.Response:
    body = await _json(request)
    if body.get("new_version") is None:
        return web.json_response({"success": False, "message": "new_version is required"}, status=400)
    if body.get("abort_all_requests", True):
        await _upstream(request, "POST", "/abort_requests", {})
    await _set_version(request, body["new_version"])
    return web.json_response({"success": True, "message": "ok"})


async def _set_version(request: web.Request, version: Any) -> None:
    if version is not None:
        await _upstream(request, "POST", "/update_weight_version", {"new_version": str(version)})
        request.app[UPSTREAM]["version"] = str(version)


async def not_wired(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "success": False,
            "message": f"{request.path} is not wired to vLLM by the vllm backend: use --update-weight-mode disk, "
            "and no --offload-rollout / --colocate",
        },
        status=400,
    )


async def _json(request: web.Request) -> dict:
    text = await request.text()
    return (await request.json()) if text.strip() else {}


def vllm_command(a: argparse.Namespace, socket_path: str) -> list[str]:
    cmd = [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", a.model_path, "--uds", socket_path]
    cmd += ["--served-model-name", "slime", "--logprobs-mode", "processed_logprobs", "--seed", str(a.seed)]
    cmd += ["--dtype", a.dtype, "--max-num-seqs", str(a.max_running_requests)]
    cmd += ["--worker-extension-cls", "slime.engine.vllm_worker.WorkerExtension"]
    if a.max_model_len:
        cmd += ["--max-model-len", str(a.max_model_len)]
    if a.tp_size > 1:
        cmd += ["--tensor-parallel-size", str(a.tp_size)]
    if a.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    if a.device == "cpu":  # a compile of minutes on a few cores buys little for the models a CPU serves
        cmd += ["--enforce-eager"]
    return cmd + a.vllm_arg


def build_app(proc: subprocess.Popen, socket_path: str, device: str) -> web.Application:
    app = web.Application(client_max_size=1 << 26)
    state = {"proc": proc, "model": "slime", "version": "default", "device": device}
    app[UPSTREAM] = state

    async def open_session(app: web.Application):
        state["session"] = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path))
        yield
        await state["session"].close()

    app.cleanup_ctx.append(open_session)
    r = app.router
    r.add_post("/generate", generate)
    for path, handler in [
        ("/health", health),
        ("/health_generate", health),
        ("/server_info", server_info),
        ("/get_server_info", server_info),
        ("/model_info", model_info),
        ("/get_model_info", model_info),
        ("/get_weight_version", get_weight_version),
    ]:
        r.add_get(path, handler)
    r.add_route("*", "/flush_cache", flush_cache)
    for path, handler in [
        ("/abort_request", abort_request),
        ("/pause_generation", pause_generation),
        ("/continue_generation", continue_generation),
        ("/update_weights_from_disk", update_weights_from_disk),
        ("/update_weight_version", update_weight_version),
    ]:
        r.add_post(path, handler)
    for path in (
        "/update_weights_from_tensor",
        "/init_weights_update_group",
        "/update_weights_from_distributed",
        "/destroy_weights_update_group",
        "/release_memory_occupation",
        "/resume_memory_occupation",
    ):
        r.add_route("*", path, not_wired)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="slime's SGLang-protocol front for a vLLM server")
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--listen-fd", type=int, default=None, help="serve on this inherited listening socket")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-running-requests", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel GPUs of this engine")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM's share of each GPU's memory")
    p.add_argument("--vllm-python", default=os.environ.get("SLIME_VLLM_PYTHON", sys.executable))
    p.add_argument("--vllm-arg", action="append", default=[], help="one more argument for vLLM's server (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a = parse_args(argv)
    socket_path = os.path.join(tempfile.mkdtemp(prefix="slime-vllm-"), "vllm.sock")
    # the workers import slime.engine.vllm_worker, from this checkout, in whatever environment vLLM runs
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": path}
    if a.device == "cpu":  # vLLM's CPU default takes ~90 % of the node's memory for its KV cache
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    proc = subprocess.Popen(vllm_command(a, socket_path), env=env, start_new_session=True)

    def stop(*_: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    if a.parent_pid:

        def watch() -> None:
            while os.getppid() == a.parent_pid and proc.poll() is None:
                time.sleep(1.0)
            stop()

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    sock = socket.socket(fileno=a.listen_fd) if a.listen_fd is not None else None
    try:
        app = build_app(proc, socket_path, a.device)
        if sock is not None:
            web.run_app(app, sock=sock, print=None, handle_signals=False, access_log=None)
        else:
            web.run_app(app, host=a.host, port=a.port, print=None, handle_signals=False, access_log=None)
    finally:
        stop()


if __name__ == "__main__":
    main()
