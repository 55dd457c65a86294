"""--rollout-backend sglang without SGLang (it cannot run on these machines): the launch line in SGLang's spellings,
run with the embedded engine standing in for `sglang.launch_server` (it accepts the same flags), driven by the same
client; and the weight-update sessions SGLang 0.5.23 requires, against a fake of its control plane (FakeSGLang...,
recording the calls and refusing updates outside a session as SGLang does)."""

import asyncio
import json
import os
import socket
import threading

import pytest
from aiohttp import web

from slime.engine.launch import launch_engine
from slime.engine.options import command_flags
from slime.sync.syncer import WeightSyncer
from slime.utils.http_utils import request_sync


def test_the_launch_line_has_sglang_spellings_and_only_options_sglang_has():
    flags = command_flags(
        {
            "model_path": "/m",
            "seed": 7,
            "tp_size": 2,
            "dtype": "bfloat16",
            "max_running_requests": 128,
            "chunked_prefill_size": 0,  # "choose for me": SGLang chooses
            "max_prefill_tokens": 0,
            "kv_cache_tokens": 4096,
            "mem_fraction_static": 0.6,
            "num_threads": 4,  # the embedded engine's own
            "backend": "paged",
            "disable_cuda_graph": False,
            "disable_radix_cache": True,
            "enable_memory_saver": True,
        },
        sglang=True,
    )
    assert flags == [
        "--model-path", "/m", "--random-seed", "7", "--tp-size", "2", "--dtype", "bfloat16",
        "--max-running-requests", "128", "--max-total-tokens", "4096", "--mem-fraction-static", "0.6",
        "--disable-radix-cache", "--enable-memory-saver",
    ]  # fmt: skip
    with pytest.raises(TypeError, match="no_such"):
        command_flags({"no_such": 1}, sglang=True)


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().split("\0")


def test_an_engine_launched_as_sglang_serves_generates_and_takes_weights(tiny_model_path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SLIME_SGLANG_SERVER_MODULE", "slime.engine.server")  # the stand-in
    srv = launch_engine(
        tiny_model_path,
        tmp_path / "logs",
        index=1,
        seed=2,
        rollout_backend="sglang",
        dtype="float32",
        num_threads=1,
        max_running_requests=8,
        enable_memory_saver=True,
        startup_timeout=120,
    )
    try:
        cmd = _cmdline(srv.proc.pid)
        assert cmd[1:3] == ["-m", "slime.engine.server"] and "--listen-fd" not in cmd and "--parent-pid" not in cmd
        assert cmd[cmd.index("--random-seed") + 1] == "3" and "--skip-server-warmup" in cmd  # seed + index
        info = json.loads(request_sync("GET", srv.url + "/server_info")[1])
        assert info["seed"] == 3 and info["enable_memory_saver"] and info["skip_server_warmup"]
        body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
        status, out = request_sync("POST", srv.url + "/generate", body)
        assert status == 200 and len(json.loads(out)["output_ids"]) == 4
        syncer = WeightSyncer([srv.url], "tensor", 1 << 20, 60, str(tmp_path))
        try:
            syncer.sync(AutoModelForCausalLM.from_pretrained(tiny_model_path), "4", rank=0)
        finally:
            syncer.close()
        assert json.loads(request_sync("GET", srv.url + "/model_info")[1])["weight_version"] == "4"
    finally:
        srv.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(srv.proc.pid, 0)  # the whole process group is gone


class FakeSGLangControlPlane:
    """A fake of SGLang's weight-update endpoints at `version` (SGLang cannot run here): records each call; from
    0.5.23 on, tensor updates outside begin/end_weight_update fail as SGLang's do."""

    def __init__(self, version: str):
        self.version, self.calls, self.session = version, [], False
        self.loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        ready = threading.Event()

        async def handle(request: web.Request) -> web.Response:
            path = request.path
            self.calls.append(path)
            if path == "/server_info":
                return web.json_response({"version": self.version})
            if path in ("/begin_weight_update", "/end_weight_update"):
                self.session = path == "/begin_weight_update"
            if path == "/update_weights_from_tensor" and self.version >= "0.5.23" and not self.session:
                msg = "must run between begin_weight_update() and end_weight_update()"
                return web.json_response({"success": False, "message": msg}, status=400)
            return web.json_response({"success": True, "message": "ok"})

        async def serve() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.SockSite(self.runner, sock).start()
            ready.set()

        threading.Thread(
            target=lambda: (self.loop.run_until_complete(serve()), self.loop.run_forever()), daemon=True
        ).start()
        ready.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("version,sessions", [("0.5.23", True), ("0.5.15", False)])
def test_weight_updates_open_a_session_where_sglang_needs_one(version, sessions, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    fake = FakeSGLangControlPlane(version)
    syncer = WeightSyncer([fake.url], "tensor", 1 << 16, 30, str(tmp_path))
    try:
        syncer.sync(AutoModelForCausalLM.from_pretrained(tiny_model_path), "1", rank=0)
    finally:
        syncer.close()
        fake.stop()
    calls = [c for c in fake.calls if c != "/server_info"]
    updates = calls.count("/update_weights_from_tensor")
    assert updates > 1  # several buckets
    expected = ["/pause_generation", "/flush_cache"]
    expected += ["/begin_weight_update"] if sessions else []
    expected += ["/update_weights_from_tensor"] * updates
    expected += ["/end_weight_update"] if sessions else []
    assert calls == expected + ["/update_weight_version", "/continue_generation"]
