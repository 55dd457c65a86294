"""Run model-written Python in a subprocess with a time limit, a memory cap, no network and no child processes.

Layers, each enough on its own for what it covers:
- a fresh network namespace (`unshare -rn`) where the kernel allows one: no interface but loopback of its own;
- an audit hook (PEP 578, cannot be removed from Python) installed before the code runs: sockets, subprocesses,
  fork/exec/spawn, kill and ctypes raise PermissionError;
- resource limits: address space (`memory_mb`), CPU seconds, file size, no core dumps; a wall-clock timeout kills
  the whole process group.
A failure is a `SandboxResult` with a reason, never an exception: the rollout feeds it back to the model and goes on.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_GUARD = r"""
import sys
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn",
            "os.spawn", "os.kill", "os.killpg", "ctypes.", "_posixsubprocess", "pty.", "resource.setrlimit")
def _guard(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_guard)
del _guard
code = sys.stdin.read()
exec(compile(code, "<tool>", "exec"), {"__name__": "__main__"})
"""


@dataclass
class SandboxResult:
    ok: bool
    stdout: str
    stderr: str
    reason: str | None = None  # why it failed: timeout, memory, blocked, error, exit code

    def to_text(self, limit: int = 2000) -> str:
        """What a tool message tells the model."""
        if self.ok:
            return self.stdout[-limit:] or "(no output)"
        last = self.stderr.strip().splitlines()[-1:] or [""]
        return f"Error ({self.reason}): {last[0][-limit:]}"


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """`unshare -rn` when this kernel lets an unprivileged process have its own network namespace."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "-rn") if ok else ()


def _limits(memory_mb: int, cpu_seconds: int) -> None:
    import resource

    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


async def run_python(
    code: str, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 8000, python: str | None = None
) -> SandboxResult:
    """Run `code` with `python -I` in a temporary directory. Returns stdout/stderr (each cut to `max_output`
    characters) and, on failure, the reason."""
    with tempfile.TemporaryDirectory(prefix="slime-sandbox-") as cwd:
        cmd = [*_netns_prefix(), python or sys.executable, "-I", "-c", _GUARD]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd, "PYTHONIOENCODING": "utf-8"}
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=functools.partial(_limits, memory_mb, max(1, int(timeout) + 1)),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(code.encode()), timeout)
        except TimeoutError:
            _kill_group(proc.pid)
            out, err = await proc.communicate()
            return SandboxResult(False, _cut(out, max_output), _cut(err, max_output), f"timeout after {timeout:g}s")
        finally:
            _kill_group(proc.pid)  # anything the code left behind
    stdout, stderr = _cut(out, max_output), _cut(err, max_output)
    if proc.returncode == 0:
        return SandboxResult(True, stdout, stderr)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "MemoryError" in last or proc.returncode == -signal.SIGKILL and not last:
        reason = f"memory limit {memory_mb} MB"
    elif "sandbox:" in last:
        reason = "blocked"
    elif proc.returncode == -signal.SIGXCPU:
        reason = "cpu time limit"
    elif last:
        reason = "error"
    else:
        reason = f"exit code {proc.returncode}"
    return SandboxResult(False, stdout, stderr, reason)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _cut(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[: limit // 2] + "\n…\n" + text[-limit // 2 :]
