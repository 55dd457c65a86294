"""HTTP server speaking SGLang's native protocol around the embedded engine.

Run: `python -m slime.engine.server --model-path SmolLM2-135M-Instruct --port 30000` (or `slime-serve`).
Field names, shapes and status codes follow SGLang's native protocol (docs/engine.md lists the endpoints and
conventions); unknown top-level keys are ignored (the router adds its own), unknown `sampling_params` keys are a 400
naming the key.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pickle
import socket
import threading
import time

import torch
from aiohttp import web
from safetensors import SafetensorError

from slime.engine.embedded import EmbeddedEngine, Request
from slime.engine.options import add_server_arguments, prefill_sizes
from slime.engine.sampling import SamplingParams, SamplingParamsError
from slime.sync.buckets import dtype_from_name
from slime.sync.transport import broadcast, deserialize_named_tensors, join_store, new_weight_group
from slime.utils import http_utils

logger = logging.getLogger(__name__)
ENGINE = web.AppKey("engine", EmbeddedEngine)
ARGS = web.AppKey("args", argparse.Namespace)
GROUPS = web.AppKey("weight_groups", dict)
RECEIVE_LOCK = web.AppKey("receive_lock", threading.Lock)
# the last weights received as CUDA IPC handles: holding them keeps their mapping open, so a sender that reuses its
# buffer (our trainer does) is not mapped again for every bucket; dropped when the engine releases its memory
IPC_HELD = web.AppKey("ipc_held", list)


class PayloadTooLarge(Exception):
    pass


async def _read_at_most(request: web.Request, limit: int) -> bytes:
    """The body, refused before reading when its declared length is over `limit`, or as soon as a chunked one grows
    past it."""
    message = f"request body is over the engine's limit of {limit} bytes (--max-request-mb)"
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"{message}: Content-Length {request.content_length}")
    data = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(message)
    return bytes(data)


class BadRequest(ValueError):
    pass


def _batched(body: dict) -> tuple[list[list[int]] | None, list[str] | None, bool]:
    """Normalise text / input_ids, single or batch. Returns (ids, texts, is_batch)."""
    ids, text = body.get("input_ids"), body.get("text")
    if (ids is None) == (text is None):
        raise BadRequest("give exactly one of `text` and `input_ids`")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise BadRequest("`input_ids` must be a non-empty list of token ids or a list of such lists")
        if all(isinstance(t, int) for t in ids):
            return [ids], None, False
        if all(isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in ids):
            return ids, None, True
        raise BadRequest("`input_ids` must be a non-empty list of token ids or a list of such lists")
    if isinstance(text, str):
        return None, [text], False
    if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        return None, text, True
    raise BadRequest("`text` must be a string or a list of strings")


async def generate(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    limit = request.app[ARGS].max_request_mb << 20
    try:
        body = http_utils.loads(await _read_at_most(request, limit))
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        if body.get("stream"):
            raise BadRequest("stream=true is not supported by the embedded engine")
        if int(body.get("top_logprobs_num") or 0) > 0:
            raise BadRequest("top_logprobs_num > 0 is not supported by the embedded engine")
        ids, texts, is_batch = _batched(body)
        if ids is None:  # off the event loop: a long text must not stall /health and every other request
            ids = await asyncio.to_thread(lambda: [engine.tokenizer.encode(t, add_special_tokens=False) for t in texts])
        n = len(ids)
        raw_params = body.get("sampling_params") or {}
        raw_params = raw_params if isinstance(raw_params, list) else [raw_params] * n
        if len(raw_params) != n:
            raise BadRequest(f"{len(raw_params)} sampling_params for {n} prompts")
        params = [SamplingParams.from_dict(p) for p in raw_params]
        rids = body.get("rid")
        rids = (rids if isinstance(rids, list) else [rids]) if rids is not None else [None] * n
        if len(rids) != n:
            raise BadRequest(f"{len(rids)} rids for {n} prompts")
        starts = body.get("logprob_start_len", -1)
        starts = [int(s) for s in (starts if isinstance(starts, list) else [starts] * n)]
        if len(starts) != n:
            raise BadRequest(f"{len(starts)} logprob_start_len values for {n} prompts")
        for prompt, p in zip(ids, params, strict=True):  # before any of them runs: a bad one would fail its batch
            engine.check_request(prompt, p)
    except PayloadTooLarge as exc:
        return web.json_response({"error": {"message": str(exc), "type": "PayloadTooLarge"}}, status=413)
    except (BadRequest, SamplingParamsError, ValueError, TypeError) as exc:
        return web.json_response({"error": {"message": str(exc)}}, status=400)

    loop = asyncio.get_running_loop()
    return_logprob = bool(body.get("return_logprob"))
    try:  # prompt log-probs (logprob_start_len >= 0): one scoring pass each, e.g. a distillation teacher's
        prompt_lps = await asyncio.gather(
            *(
                asyncio.to_thread(engine.prompt_logprobs, prompt, s, p.temperature)
                if return_logprob and s >= 0
                else asyncio.sleep(0, result=None)
                for prompt, p, s in zip(ids, params, starts, strict=True)
            )
        )
    except ValueError as exc:
        return web.json_response({"error": {"message": str(exc)}}, status=400)
    futures, reqs, items = [], [], []
    try:
        for prompt, p, rid in zip(ids, params, rids, strict=True):
            fut = loop.create_future()
            futures.append(fut)
            if p.max_new_tokens == 0:  # nothing to generate: answered at once (prompt scoring)
                fut.set_result(None)
            else:
                items.append((prompt, p, _resolver(loop, fut), rid))
        reqs = engine.submit_many(items)  # a batch is admitted together
        done: list[Request | None] = await asyncio.gather(*futures)
    except asyncio.CancelledError:  # client went away: free the engine
        for r in reqs:
            engine.abort(r.rid)
        raise
    except ValueError as exc:
        for r in reqs:
            engine.abort(r.rid)
        return web.json_response({"error": {"message": str(exc)}}, status=400)
    want_text = bool(body.get("return_text_in_logprobs"))
    out = []
    for prompt, r, lps in zip(ids, done, prompt_lps, strict=True):
        res = _response(engine, r, return_logprob, want_text) if r is not None else _scored(engine, prompt)
        if lps is not None:
            scored = prompt[len(prompt) - len(lps) :]
            texts = [engine.tokenizer.decode([t]) if want_text else None for t in scored]
            res["meta_info"]["input_token_logprobs"] = [list(x) for x in zip(lps, scored, texts, strict=True)]
        out.append(res)
    return web.Response(body=http_utils.dumps_answer(out if is_batch else out[0]), content_type="application/json")


def _scored(engine: EmbeddedEngine, prompt: list[int]) -> dict:
    """The answer to a request with max_new_tokens 0: no output (the prompt's log-probs are added by the caller)."""
    meta = {
        "id": None,
        "finish_reason": {"type": "length", "length": 0},
        "prompt_tokens": len(prompt),
        "completion_tokens": 0,
        "cached_tokens": 0,
        "weight_version": engine.weight_version,
        "output_token_logprobs": [],
        "output_token_logprobs_length": 0,
    }
    return {"text": "", "output_ids": [], "meta_info": meta}


def _resolver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future):
    def done(req: Request) -> None:
        loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(req))

    return done


def _response(engine: EmbeddedEngine, r: Request, return_logprob: bool, want_text: bool) -> dict:
    p, reason = r.params, r.finish_reason
    visible = r.output_ids
    if reason["type"] == "stop" and isinstance(reason.get("matched"), int) and not p.no_stop_trim:
        visible = visible[:-1]
    text = engine.tokenizer.decode(
        visible,
        skip_special_tokens=p.skip_special_tokens,
        spaces_between_special_tokens=p.spaces_between_special_tokens,
    )
    if reason["type"] == "stop" and isinstance(reason.get("matched"), str) and not p.no_stop_trim:
        cut = text.find(reason["matched"])
        text = text[:cut] if cut >= 0 else text
    meta = {
        "id": r.rid,
        "finish_reason": reason,
        "prompt_tokens": len(r.input_ids),
        "completion_tokens": len(r.output_ids),
        "cached_tokens": r.cached_tokens,
        "reasoning_tokens": 0,
        "num_retractions": 0,
        "weight_version": r.weight_version,
        "e2e_latency": round(r.finished - r.created, 6),
    }
    if r.version_spans:
        meta["weight_versions"] = r.version_spans
    if return_logprob:
        toks = [engine.tokenizer.decode([t]) for t in r.output_ids] if want_text else [None] * len(r.output_ids)
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [[lp, t, s] for lp, t, s in zip(r.logprobs, r.output_ids, toks, strict=True)]
        meta["output_token_logprobs_length"] = len(r.output_ids)
    return {"text": text, "output_ids": r.output_ids, "meta_info": meta}


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if not engine.alive():
        return web.Response(status=503, text="engine thread is not running")
    return web.Response(status=200)


async def health_generate(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if engine.paused or engine.weights_released:  # generation is held on purpose; the server itself is fine
        return await health(request)
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    bos = engine.tokenizer.bos_token_id if engine.tokenizer.bos_token_id is not None else 0
    req = engine.submit([bos], SamplingParams(max_new_tokens=1, temperature=0.0), _resolver(loop, fut))
    try:
        await asyncio.wait_for(fut, timeout=20)
    except TimeoutError:
        engine.abort(req.rid)
        return web.Response(status=503, text="1-token health generation did not finish within 20 s")
    return web.Response(status=200)


async def model_info(request: web.Request) -> web.Response:
    engine, args = request.app[ENGINE], request.app[ARGS]
    return web.json_response(
        {
            "model_path": engine.model_path,
            "served_model_name": args.model_path,
            "tokenizer_path": engine.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
            "load_format": "auto",
            "model_type": engine.config.model_type,
            "architectures": list(getattr(engine.config, "architectures", None) or []),
        }
    )


async def server_info(request: web.Request) -> web.Response:
    engine, args = request.app[ENGINE], request.app[ARGS]
    info = {k: v for k, v in vars(args).items()}
    info.update(
        {
            "version": "slime-embedded",
            "tp_size": 1,
            "dp_size": 1,
            "dtype": engine.dtype,
            "device": engine.device.type,
            "backend": engine.backend,
            "backend_fallback": engine.backend_note,
            "decode_step_compiled": engine.decode_step_compiled,
            "weight_version": engine.weight_version,
            "weights_released": engine.weights_released,
            # /update_weights_from_tensor answers after the copy out of the sender's tensors has finished on the
            # device, so a sender may refill the same buffer for the next bucket
            "weights_copied_before_answer": True,
            "weight_bytes": engine.weight_bytes(),
            "internal_states": [dict(engine.stats, **engine.loads())],
        }
    )
    return web.json_response(info)


async def loads(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response(
        {
            "timestamp": time.time(),
            "version": "slime-embedded",
            "accelerator": engine.device.type,
            "num_accelerators": int(engine.device.type != "cpu"),
            "loads": [dict(dp_rank=0, **engine.loads())],
        }
    )


async def _json_or_empty(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from exc
    return body if isinstance(body, dict) else {}


async def flush_cache(request: web.Request) -> web.Response:
    try:
        dropped = await asyncio.to_thread(request.app[ENGINE].flush_cache)
    except RuntimeError as exc:
        return web.Response(status=400, text=f"Cache not flushed: {exc}")
    return web.Response(status=200, text=f"Cache flushed: {dropped} cached prefix blocks dropped.")


async def abort_request(request: web.Request) -> web.Response:
    body = await _json_or_empty(request)
    request.app[ENGINE].abort(body.get("rid"), abort_all=bool(body.get("abort_all")))
    return web.Response(status=200)


async def pause_generation(request: web.Request) -> web.Response:
    body = await _json_or_empty(request)
    try:
        await asyncio.to_thread(request.app[ENGINE].pause, body.get("mode") or "abort")
    except (ValueError, TimeoutError) as exc:
        return web.json_response({"message": str(exc), "status": "error"}, status=400)
    return web.json_response({"message": "Generation paused", "status": "ok"})


async def release_memory_occupation(request: web.Request) -> web.Response:
    body = await _json_or_empty(request)
    request.app[IPC_HELD].clear()  # a colocated trainer frees its sync buffer too: let the mapping go
    try:
        memory = await asyncio.to_thread(request.app[ENGINE].release_memory, body.get("tags"))
    except (ValueError, RuntimeError) as exc:
        return web.json_response({"message": str(exc), "status": "error"}, status=400)
    return web.json_response(memory)


async def resume_memory_occupation(request: web.Request) -> web.Response:
    body = await _json_or_empty(request)
    try:
        memory = await asyncio.to_thread(request.app[ENGINE].resume_memory, body.get("tags"))
    except ValueError as exc:
        return web.json_response({"message": str(exc), "status": "error"}, status=400)
    return web.json_response(memory)


async def continue_generation(request: web.Request) -> web.Response:
    request.app[ENGINE].resume()
    return web.json_response({"message": "Generation continued", "status": "ok"})


def _version(body: dict) -> str | None:
    v = body.get("weight_version")
    return None if v is None else str(v)


async def update_weights_from_disk(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _json_or_empty(request)
    if not body.get("model_path"):
        return web.json_response({"success": False, "message": "model_path is required"}, status=400)
    if body.get("abort_all_requests"):
        engine.abort(abort_all=True, message="Aborted by weight update")
    try:  # "partial": ours, a folder holding only some of the weights (otherwise every weight must be there)
        n = await asyncio.to_thread(
            engine.update_weights_from_disk, body["model_path"], _version(body), bool(body.get("partial"))
        )
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
        return web.json_response({"success": False, "message": f"{type(exc).__name__}: {exc}"}, status=400)
    msg = f"Loaded {n} tensors from {body['model_path']}"
    return web.json_response({"success": True, "message": msg, "num_paused_requests": 0})


async def update_weights_from_tensor(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _json_or_empty(request)
    payloads = body.get("serialized_named_tensors")
    if not isinstance(payloads, list) or not payloads:
        return web.json_response({"success": False, "message": "serialized_named_tensors is required"}, status=400)
    if body.get("abort_all_requests"):
        engine.abort(abort_all=True, message="Aborted by weight update")

    def load() -> int:
        try:
            tensors = list(deserialize_named_tensors(payloads[0], body.get("load_format")))  # tp_rank 0: one here
        except Exception as exc:  # noqa: BLE001 - whatever a malformed payload raises, the caller gets a 400
            raise ValueError(f"serialized_named_tensors[0] could not be read: {type(exc).__name__}: {exc}") from exc
        if not tensors:
            raise ValueError("serialized_named_tensors[0] holds no tensors")
        if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in tensors):
            raise ValueError("serialized_named_tensors[0] must hold (name, tensor) pairs")
        n = engine.update_weights(tensors, _version(body))
        request.app[IPC_HELD][:] = tensors if tensors[0][1].is_cuda else []
        return n

    try:
        n = await asyncio.to_thread(load)
    except (KeyError, ValueError, TypeError, pickle.UnpicklingError, RuntimeError) as exc:
        return web.json_response({"success": False, "message": f"{type(exc).__name__}: {exc}"}, status=400)
    return web.json_response({"success": True, "message": f"Loaded {n} tensors"})


async def init_weights_update_group(request: web.Request) -> web.Response:
    """Join the trainer's broadcast group as rank `rank_offset` (one rank per engine here)."""
    body = await _json_or_empty(request)
    missing = [k for k in ("master_address", "master_port", "rank_offset", "world_size") if k not in body]
    if missing:
        return web.json_response({"success": False, "message": f"missing fields: {missing}"}, status=400)
    name = body.get("group_name", "weight_update_group")
    groups = request.app[GROUPS]
    if name in groups:
        return web.json_response({"success": False, "message": f"group {name!r} exists: destroy it first"}, status=400)
    timeout = float(body.get("timeout", 600))

    def join() -> object:
        rank, world = int(body["rank_offset"]), int(body["world_size"])
        store = join_store(body["master_address"], int(body["master_port"]), world, timeout)
        return new_weight_group(store, rank, world, name, body.get("backend", "nccl"), timeout)

    try:
        groups[name] = await asyncio.to_thread(join)
    except (RuntimeError, ValueError, OSError) as exc:
        return web.json_response({"success": False, "message": f"joining {name!r}: {exc}"}, status=400)
    return web.json_response({"success": True, "message": f"joined {name!r} as rank {body['rank_offset']}"})


async def destroy_weights_update_group(request: web.Request) -> web.Response:
    body = await _json_or_empty(request)
    group = request.app[GROUPS].pop(body.get("group_name", "weight_update_group"), None)
    return web.json_response({"success": group is not None, "message": "destroyed" if group else "no such group"})


async def update_weights_from_distributed(request: web.Request) -> web.Response:
    """Receive tensors broadcast by the trainer (rank 0), in the listed order, then load them."""
    engine = request.app[ENGINE]
    body = await _json_or_empty(request)
    name = body.get("group_name", "weight_update_group")
    group = request.app[GROUPS].get(name)
    if group is None:
        return web.json_response({"success": False, "message": f"no weight update group {name!r}"}, status=400)
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        return web.json_response({"success": False, "message": "names, dtypes and shapes lists are required"}, 400)
    if not len(names) == len(dtypes) == len(shapes):
        return web.json_response({"success": False, "message": "names, dtypes, shapes differ in length"}, status=400)
    if body.get("abort_all_requests"):
        engine.abort(abort_all=True, message="Aborted by weight update")

    def receive() -> int:
        with request.app[RECEIVE_LOCK]:  # broadcasts must be consumed in the order the trainer sends them
            tensors = [
                torch.empty(s, dtype=dtype_from_name(d), device=engine.device)
                for d, s in zip(dtypes, shapes, strict=True)
            ]
            broadcast(group, tensors, float(body.get("timeout", 600)), f"{len(names)} tensors from the trainer")
            return engine.update_weights(zip(names, tensors, strict=True), _version(body))

    try:
        n = await asyncio.to_thread(receive)
    except (KeyError, ValueError, TypeError, TimeoutError, RuntimeError) as exc:
        return web.json_response({"success": False, "message": f"{type(exc).__name__}: {exc}"}, status=400)
    return web.json_response({"success": True, "message": f"Loaded {n} tensors"})


async def get_weight_version(request: web.Request) -> web.Response:
    return web.json_response({"weight_version": request.app[ENGINE].weight_version})


async def update_weight_version(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _json_or_empty(request)
    if body.get("new_version") is None:
        return web.json_response({"success": False, "message": "new_version is required"}, status=400)
    if body.get("abort_all_requests", True):
        engine.abort(abort_all=True, message="Aborted by weight version update")
    await asyncio.to_thread(engine.update_weights, [], str(body["new_version"]))
    return web.json_response({"success": True, "message": "ok"})


def build_app(engine: EmbeddedEngine, args: argparse.Namespace) -> web.Application:
    app = web.Application(client_max_size=1 << 30)
    app[ENGINE], app[ARGS] = engine, args
    app[GROUPS], app[RECEIVE_LOCK], app[IPC_HELD] = {}, threading.Lock(), []
    r = app.router
    r.add_post("/generate", generate)
    for path, handler in [
        ("/health", health),
        ("/health_generate", health_generate),
        ("/model_info", model_info),
        ("/get_model_info", model_info),
        ("/server_info", server_info),
        ("/get_server_info", server_info),
        ("/v1/loads", loads),
        ("/get_weight_version", get_weight_version),
    ]:
        r.add_get(path, handler)
    r.add_route("*", "/flush_cache", flush_cache)
    r.add_route("*", "/release_memory_occupation", release_memory_occupation)
    r.add_route("*", "/resume_memory_occupation", resume_memory_occupation)
    for path, handler in [
        ("/abort_request", abort_request),
        ("/pause_generation", pause_generation),
        ("/continue_generation", continue_generation),
        ("/update_weights_from_disk", update_weights_from_disk),
        ("/update_weights_from_tensor", update_weights_from_tensor),
        ("/update_weight_version", update_weight_version),
        ("/init_weights_update_group", init_weights_update_group),
        ("/destroy_weights_update_group", destroy_weights_update_group),
        ("/update_weights_from_distributed", update_weights_from_distributed),
    ]:
        r.add_post(path, handler)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="slime embedded engine: an SGLang-protocol HTTP server on transformers")
    add_server_arguments(p)
    return p.parse_args(argv)


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        logger.error("launcher process %d is gone; exiting", parent_pid)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def build_engine(args: argparse.Namespace, model_path: str, common: dict):
    """The engine of `--backend`; `auto` tries the paged one and falls back to padded when the model's attention is
    one the paged engine does not implement (a wasted model load, once, at start)."""
    from slime.engine.padded import PaddedEngine
    from slime.engine.paged import PagedEngine
    from slime.engine.paged_attention import PagedUnsupported

    if args.backend == "padded":
        return PaddedEngine(model_path, **common)
    try:
        return PagedEngine(
            model_path,
            block_size=args.page_size,
            kv_cache_tokens=args.kv_cache_tokens,
            mem_fraction_static=args.mem_fraction_static,
            cuda_graph=not args.disable_cuda_graph,
            cuda_graph_max_bs=args.cuda_graph_max_bs,
            torch_compile=not args.disable_torch_compile,
            prefix_cache=not args.disable_radix_cache,
            decode_steps=args.num_continuous_decode_steps,
            **common,
        )
    except PagedUnsupported as exc:
        if args.backend == "paged":
            raise
        logger.warning("%s; --backend auto: serving with the padded backend instead", exc)
        engine = PaddedEngine(model_path, **common)
        engine.backend_note = exc.reason
        return engine


class _Http2ProbeFilter(logging.Filter):
    """sglang-router probes every worker it adds for gRPC by opening an HTTP/2 connection; this HTTP/1.1 server
    refuses it, as it should, and aiohttp logs each refusal with a traceback that reads like a fault. One plain line
    instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and "PRI/Upgrade" in str(exc):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "refused an HTTP/2 connection (a gRPC probe)",
                (),
                None,
                None,
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_Http2ProbeFilter())
    args = parse_args(argv)
    if args.parent_pid:
        _exit_with_parent(args.parent_pid)
    from slime.hub.provision import resolve_checkpoint

    chunk, per_pass = prefill_sizes(args.device != "cpu", args.chunked_prefill_size, args.max_prefill_tokens)
    common = dict(
        dtype=args.dtype,
        max_running_requests=args.max_running_requests,
        max_prefill_tokens=per_pass,
        chunked_prefill_size=chunk,
        seed=args.seed,
        num_threads=args.num_threads or None,
        device=args.device,
    )
    engine = build_engine(args, resolve_checkpoint(args.model_path), common)
    app = build_app(engine, args)
    if args.listen_fd >= 0:
        sock = socket.socket(fileno=args.listen_fd)
        logger.info("serving %s on http://%s:%d", args.model_path, *sock.getsockname()[:2])
        web.run_app(app, sock=sock, print=None, access_log=None)
    else:
        logger.info("serving %s on http://%s:%d", args.model_path, args.host, args.port)
        web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
