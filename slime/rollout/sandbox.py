"""Run model-written Python inside a kernel-enforced boundary: `await run_python(code)` -> `SandboxResult`.

The boundary (built by `sandbox_init.py`, one fresh set per run):
- namespaces: its own mount, network, PID, IPC and UTS namespaces (inside a user namespace when not run as root).
  The network namespace has only a loopback of its own, down: no host address, no host's abstract sockets;
- filesystem: a new read-only root holding only the system's programs and libraries and this interpreter
  (bind-mounted read-only), a private /tmp (tmpfs, `tmp_mb`) and /dev with null/zero/full/random/urandom.
  The host's home directories, /etc/shadow, /run, /var and every socket file do not exist inside;
- user: uid 65534 (nobody) — a real unprivileged uid when slime runs as root, otherwise nobody in a nested user
  namespace that owns none of the outer ones;
- seccomp: no new processes (threads are fine), no exec, no namespaces, mounts, tracing, io_uring or kernel
  state; no_new_privs;
- limits: address space (`memory_mb`), CPU seconds, file size, 256 open files, no core dumps; output read as it
  comes and cut to its first and last `max_output` characters, the run killed past `output_limit_mb`; a wall-clock
  timeout kills the whole tree (the PID namespace dies with its init, init dies with the launcher).
When the kernel refuses a layer (no unprivileged user namespaces, a container without CAP_SYS_ADMIN, another
architecture for seccomp), the first run says which, once, and every run raises `SandboxUnavailable` unless weak
isolation was allowed: `--allow-weak-sandbox`, `allow_weak_sandbox(True)` or SLIME_ALLOW_WEAK_SANDBOX=1.
A failure of the code itself is a `SandboxResult` with a reason, never an exception: the rollout feeds it back to
the model and goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_INIT = str(Path(__file__).with_name("sandbox_init.py"))
_EXIT_REFUSED = 97
_allow_weak: bool | None = None
_reported = False


class SandboxUnavailable(RuntimeError):
    """The kernel would not give the sandbox every layer, and weak isolation was not allowed."""


@dataclass
class SandboxResult:
    ok: bool
    stdout: str
    stderr: str
    reason: str | None = None  # why it failed: timeout, memory, blocked, output limit, error, exit code
    layers: dict[str, str] = field(default_factory=dict)  # what isolation held for this run

    def to_text(self, limit: int = 2000) -> str:
        """What a tool message tells the model."""
        if self.ok:
            return self.stdout[-limit:] or "(no output)"
        last = self.stderr.strip().splitlines()[-1:] or [""]
        return f"Error ({self.reason}): {last[0][-limit:]}"


def allow_weak_sandbox(allow: bool) -> None:
    """Run code even where some layer of the boundary is missing (the missing ones are logged once)."""
    global _allow_weak
    _allow_weak = allow


def _weak_allowed() -> bool:
    if _allow_weak is not None:
        return _allow_weak
    return os.environ.get("SLIME_ALLOW_WEAK_SANDBOX", "").lower() in ("1", "true", "yes")


class _Capped:
    """A stream's first and last `limit` bytes and its total length, whatever its size."""

    def __init__(self, limit: int):
        self.limit, self.head, self.tail, self.total = limit, bytearray(), bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail = (self.tail + chunk)[-self.limit :]

    def text(self) -> str:
        head = self.head.decode("utf-8", errors="replace")
        if self.total <= 2 * self.limit:
            return head + self.tail.decode("utf-8", errors="replace")
        return f"{head}\n… [{self.total - 2 * self.limit} bytes cut] …\n{self.tail.decode('utf-8', errors='replace')}"


async def run_python(
    code: str,
    timeout: float = 5.0,
    memory_mb: int = 512,
    max_output: int = 8000,
    python: str | None = None,
    tmp_mb: int = 64,
    output_limit_mb: int = 16,
) -> SandboxResult:
    """Run `code` in a fresh sandbox. Returns stdout/stderr (each its first and last `max_output // 2` bytes) and,
    on failure, the reason. Raises SandboxUnavailable when a layer is missing and weak isolation is not allowed."""
    cfg = {
        "memory_mb": memory_mb,
        "cpu_seconds": max(1, int(timeout) + 1),
        "file_mb": 16,
        "tmp_mb": tmp_mb,
        "require": not _weak_allowed(),
    }
    with tempfile.TemporaryDirectory(prefix="slime-sandbox-") as workdir:
        os.chmod(workdir, 0o1777)  # the working directory only where there is no private /tmp
        cfg["workdir"] = workdir
        return await _run(code, cfg, timeout, max_output, output_limit_mb, python)


async def _run(code: str, cfg: dict, timeout: float, max_output: int, output_limit_mb: int, python: str | None):
    report_r, report_w = os.pipe()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "PYTHONIOENCODING": "utf-8", "LANG": "C.UTF-8"}
    try:
        proc = await asyncio.create_subprocess_exec(
            python or sys.executable, "-I", _INIT, json.dumps(cfg), str(report_w),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd="/", env=env, start_new_session=True, pass_fds=(report_w,),
        )  # fmt: skip
    finally:
        os.close(report_w)
    out, err = _Capped(max_output // 2), _Capped(max_output // 2)
    limit_bytes, over = output_limit_mb << 20, asyncio.Event()

    async def pump(stream: asyncio.StreamReader, sink: _Capped) -> None:
        while chunk := await stream.read(1 << 16):
            sink.add(chunk)
            if out.total + err.total > limit_bytes:
                over.set()
                _kill_tree(proc.pid)

    async def feed() -> None:
        try:
            proc.stdin.write(code.encode())
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before reading, or killed

    loop = asyncio.get_running_loop()
    report_task = loop.run_in_executor(None, _read_all, report_r)
    work = asyncio.gather(pump(proc.stdout, out), pump(proc.stderr, err), feed(), proc.wait())
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(work), timeout)
    except TimeoutError:
        timed_out = True
    finally:
        _kill_tree(proc.pid)
    try:
        await asyncio.wait_for(work, 10)  # the tree is dead: its pipes close
    except TimeoutError:
        logger.error("sandbox: output pipes still open 10 s after the kill of pid %d", proc.pid)
    report = _parse_report(await report_task)
    _report_once(report)
    if proc.returncode == _EXIT_REFUSED and report.get("missing"):
        raise SandboxUnavailable(_missing_message(report))
    stdout, stderr = out.text(), err.text()
    layers = report.get("layers", {})
    if timed_out:
        return SandboxResult(False, stdout, stderr, f"timeout after {timeout:g}s", layers)
    if over.is_set():
        return SandboxResult(False, stdout, stderr, f"output limit {output_limit_mb} MB", layers)
    if proc.returncode == 0:
        return SandboxResult(True, stdout, stderr, None, layers)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "MemoryError" in last or proc.returncode == -signal.SIGKILL and not last:
        reason = f"memory limit {cfg['memory_mb']} MB"
    elif last.startswith(("PermissionError", "OSError: [Errno 101]")) or "sandbox:" in last:
        reason = "blocked"
    elif proc.returncode == -signal.SIGXCPU:
        reason = "cpu time limit"
    elif last:
        reason = "error"
    else:
        reason = f"exit code {proc.returncode}"
    return SandboxResult(False, stdout, stderr, reason, layers)


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _parse_report(raw: bytes) -> dict:
    try:
        return json.loads(raw.decode())
    except ValueError:
        return {}


def _missing_message(report: dict) -> str:
    missing = ", ".join(f"{k}: {report['layers'].get(k)}" for k in report["missing"])
    return (
        f"the tool sandbox cannot be fully set up on this machine ({missing}); model-written code is not run. "
        "Pass --allow-weak-sandbox (or set SLIME_ALLOW_WEAK_SANDBOX=1) to run it with the layers that remain"
    )


def _report_once(report: dict) -> None:
    global _reported
    if _reported or not report:
        return
    _reported = True
    layers = "; ".join(f"{k}: {v}" for k, v in report.get("layers", {}).items())
    if report.get("missing"):
        logger.warning("sandbox: weak isolation (%s)%s", layers, "" if _weak_allowed() else " — refused")
    else:
        logger.info("sandbox: %s", layers)


def _kill_tree(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
