"""request_sync: kept-alive connections, a kept connection the server closed, and failures named by URL."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from aiohttp import web

from slime.utils.http_utils import request_sync


class _Server:
    """An aiohttp server on loopback in a thread; `peers` holds the client end of every connection it served."""

    def __init__(self, keepalive_timeout: float):
        self.peers: set = set()
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        started = threading.Event()

        async def echo(request: web.Request) -> web.Response:
            body = await request.read()
            self.peers.add(request.transport.get_extra_info("peername"))  # one client port per TCP connection
            return web.json_response({"path": request.path_qs, "body": json.loads(body) if body else None})

        async def serve() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", echo)
            self.runner = web.AppRunner(app, keepalive_timeout=keepalive_timeout)
            await self.runner.setup()
            await web.SockSite(self.runner, self.sock).start()
            started.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(serve()), self.loop.run_forever()))
        self.thread.daemon = True
        self.thread.start()
        started.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def server():
    s = _Server(keepalive_timeout=0.3)
    yield s
    s.stop()


def test_calls_from_one_thread_share_one_connection_and_survive_its_idle_close(server):
    for i in range(20):
        status, body = request_sync("POST", f"{server.url}/pause?x={i}", {"i": i})
        assert status == 200 and json.loads(body) == {"path": f"/pause?x={i}", "body": {"i": i}}
    assert len(server.peers) == 1
    time.sleep(0.8)  # past the server's keep-alive timeout: it closes the idle connection
    status, body = request_sync("GET", f"{server.url}/server_info")
    assert status == 200 and json.loads(body)["body"] is None
    assert len(server.peers) == 2


def test_an_absent_server_is_a_connection_error_naming_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/flush_cache"  # bound, not listening: refused
        with pytest.raises(ConnectionError, match="flush_cache"):
            request_sync("POST", url, {}, timeout=2)


def test_the_async_client_reads_json_answers_once_and_text_as_text():
    """post/get: a JSON answer is decoded (also one holding NaN, which orjson alone refuses), any other body comes
    back as text, an empty one as None; a 4xx is an HTTPError carrying the server's words."""
    from slime.utils.http_utils import HTTPError, close_sessions, dumps_answer, get, post

    bodies = {
        "/json": (200, dumps_answer({"meta_info": {"output_token_logprobs": [[-0.5, 7, None]]}})),
        "/nan": (200, b'{"x": NaN}'),
        "/text": (200, b"OK"),
        "/empty": (200, b""),
        "/bad": (400, b'{"error": {"message": "temperature must be >= 0"}}'),
    }

    async def answer(request: web.Request) -> web.Response:
        status, body = bodies[request.path]
        return web.Response(status=status, body=body)

    async def main() -> list:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            got = [await post(url + "/json", {"a": 1}), await get(url + "/nan"), await get(url + "/text")]
            got.append(await get(url + "/empty"))
            with pytest.raises(HTTPError, match="HTTP 400.*temperature must be >= 0"):
                await post(url + "/bad", {}, max_retries=3)
            return got
        finally:
            await close_sessions()
            await runner.cleanup()

    as_json, nan, text, empty = asyncio.run(main())
    assert as_json == {"meta_info": {"output_token_logprobs": [[-0.5, 7, None]]}}
    assert nan["x"] != nan["x"] and text == "OK" and empty is None
