"""Start engine servers as child processes and wait, with a deadline, until they serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slime.engine.options import command_flags
from slime.utils.http_utils import request_sync


def answers(url: str, timeout: float = 5.0) -> bool:
    """Whether GET `url` answers 200 within `timeout` seconds."""
    try:
        return request_sync("GET", url, timeout=timeout)[0] == 200
    except ConnectionError:
        return False


def wait_serving(server: Any, who: str, path: str, timeout: float) -> None:
    """Poll `GET server.url + path` until 200 (`server`: a ServerProcess or a RayEngine). Raises naming `who`, what
    it waited for and the log tail when the server exits first (then without waiting out `timeout`) or does not
    answer in time (then it is stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(server.url + path):
            return
        if not server.alive():
            raise RuntimeError(
                f"{who} exited ({server.exit_note()}) before serving {server.url}; log {server.log_path}:\n"
                f"{server.log_tail()}"
            )
        time.sleep(0.25)
    tail = server.log_tail()
    server.stop()
    raise TimeoutError(
        f"{who} did not answer GET {path} with 200 within {timeout:.0f}s; log {server.log_path}:\n{tail}"
    )


@dataclass
class ServerProcess:
    """A child HTTP server (engine or router) with its URL and log file."""

    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def wait_ready(self, path: str, timeout: float) -> None:
        wait_serving(self, self.name, path, timeout)

    def exit_note(self) -> str:
        return f"exit {self.proc.returncode}"

    def terminate(self) -> None:
        if self.alive():
            self._signal_group(signal.SIGTERM)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `grace` seconds; to its whole process group (it was
        started in a session of its own), so a server's own workers (SGLang's, vLLM's) go with it."""
        if self.alive():
            self.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(5)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            self.proc.send_signal(sig)


@dataclass
class ExternalEngine:
    """An engine server this run did not start (--rollout-external-engine-addrs): used, health-checked and given
    weights like the others, never started, stopped or restarted."""

    name: str
    url: str
    proc: None = None
    log_path: str = "(an external engine: its log is where it was started)"
    started: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return answers(self.url + "/health", timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path

    def exit_note(self) -> str:
        return "no answer to /health"

    def wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if answers(self.url + path):
                return
            time.sleep(0.5)
        raise TimeoutError(f"external engine {self.url} did not answer GET {path} with 200 within {timeout:.0f}s")

    def terminate(self) -> None:
        pass

    def stop(self, grace: float = 10.0) -> None:
        pass


def _die_with_parent() -> None:
    """In the child before exec: Linux sends SIGKILL when the thread that started it exits."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(
    name: str,
    cmd: list[str],
    url: str,
    log_dir: str | Path,
    env: dict | None = None,
    die_with_parent: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> ServerProcess:
    """Start `cmd` with its output in `log_dir/<name>.log`. `die_with_parent`: killed with the starting thread (for
    servers started by a long-lived thread, on Linux), so a killed run leaves no orphan. `pass_fds`: file
    descriptors the child inherits (a listening socket)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "w")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
        pass_fds=pass_fds,
    )
    return ServerProcess(name, url, proc, log_path)


def launch_engine(
    model_path: str,
    log_dir: str | Path,
    index: int = 0,
    host: str = "127.0.0.1",
    seed: int = 0,
    startup_timeout: float = 300.0,
    wait: bool = True,
    restart: int = 0,
    device: str = "cpu",
    gpu: str | None = None,
    rollout_backend: str = "embedded",
    **options: Any,
) -> ServerProcess:
    """Start one engine server on a free port: the embedded engine (`python -m slime.engine.server`); for
    `rollout_backend="vllm"` the SGLang-protocol front that runs vLLM behind it (`slime.engine.vllm_adapter`); for
    "sglang" SGLang's own server (`python -m sglang.launch_server`; $SLIME_SGLANG_PYTHON and
    $SLIME_SGLANG_SERVER_MODULE replace the interpreter and the module, e.g. a patched launcher).
    `restart` > 0 names the log of a replacement for engine `index` (engine-<index>-restart<n>.log), so the dead
    one's log is kept.
    `gpu`: the physical GPU id it may see (CUDA_VISIBLE_DEVICES; it runs on cuda:0 then). `options`: engine options
    by name (slime.engine.options, e.g. dtype="bfloat16", num_threads=2, max_running_requests=32)."""
    sock = socket.create_server((host, 0))  # bound and listening now; our servers inherit it (--listen-fd)
    port = sock.getsockname()[1]
    pass_fds: tuple[int, ...] = (sock.fileno(),)
    if rollout_backend == "sglang":  # SGLang binds its own port: the socket is closed just before it starts
        python = os.environ.get("SLIME_SGLANG_PYTHON", sys.executable)
        module = os.environ.get("SLIME_SGLANG_SERVER_MODULE", "sglang.launch_server")
        values = {"model_path": model_path, "host": host, "port": port, "seed": seed + index, "device": device}
        cmd = [python, "-m", module, *command_flags({**values, **options, "skip_server_warmup": True}, sglang=True)]
        sock.close()
        pass_fds = ()
    else:
        module = {"embedded": "slime.engine.server", "vllm": "slime.engine.vllm_adapter"}[rollout_backend]
        cmd = [sys.executable, "-m", module, "--model-path", model_path, "--host", host, "--port", str(port)]
        cmd += ["--listen-fd", str(sock.fileno()), "--seed", str(seed + index), "--parent-pid", str(os.getpid())]
        if rollout_backend == "vllm":  # vLLM takes its own options; these are the ones the run sets that it has too
            cmd += ["--device", device, "--dtype", options.get("dtype") or "bfloat16"]
            cmd += ["--max-running-requests", str(options.get("max_running_requests") or 256)]
            cmd += ["--tp-size", str(options.get("tp_size") or 1)]
            if device == "cuda" and options.get("mem_fraction_static"):
                cmd += ["--gpu-memory-utilization", str(options["mem_fraction_static"])]
        else:
            cmd += ["--device", device, *command_flags(options)]
    threads = options.get("num_threads")
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    name = f"engine-{index}" + (f"-restart{restart}" if restart else "")
    try:
        server = spawn(
            name, cmd, f"http://{host}:{port}", log_dir, env, die_with_parent=not pass_fds, pass_fds=pass_fds
        )
    finally:
        sock.close()  # the server holds its own copy
    if wait:
        server.wait_ready("/health", startup_timeout)
    return server
