"""The tool sandbox is a kernel-enforced boundary: each probe below is an ordinary model accident or a one-line escape
that an audit hook alone let through. Where this kernel cannot give a layer, the sandbox refuses to run code unless
weak isolation is allowed."""

import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import slime.rollout.sandbox as sandbox
from slime.rollout.sandbox import run_python


def _run(code, **kw):
    return asyncio.run(run_python(code, **kw))


@pytest.fixture(scope="module")
def local_http_server():
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"secret")

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hits
    server.shutdown()


def test_ordinary_code_runs_with_every_layer_in_place():
    r = _run("import math, json, threading, asyncio\nprint(json.dumps({'v': math.comb(10, 3)}))")
    assert r.ok and r.stdout.strip() == '{"v": 120}' and r.to_text().strip() == '{"v": 120}'
    assert set(r.layers) == {"namespaces", "filesystem", "user", "limits", "seccomp"}
    assert not any(v.startswith("missing") for v in r.layers.values()), r.layers
    r = _run("x = 1/0")
    assert not r.ok and r.reason == "error" and "ZeroDivisionError" in r.to_text()
    r = _run("import os, tempfile\nprint(os.getuid(), os.getpid(), os.getcwd())\nopen('/tmp/a', 'w').write('x')")
    assert r.ok and r.stdout.split() == ["65534", "2", "/tmp"], r  # nobody, in its own PID namespace


def test_network_host_loopback_and_host_sockets_are_unreachable(local_http_server, tmp_path):
    port, hits = local_http_server
    r = _run(f"import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{port}/x', timeout=3).read())")
    assert not r.ok and hits == [] and "unreachable" in r.stderr.lower(), r
    # a Unix socket on the host's filesystem and an abstract one (scoped by the network namespace)
    path = tmp_path / "host.sock"
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    servers[0].bind(str(path))
    servers[1].bind("\0slime-sandbox-test")
    for s in servers:
        s.listen()
    code = textwrap.dedent(f"""
        import socket
        for addr in ({str(path)!r}, '\\0slime-sandbox-test'):
            try:
                socket.socket(socket.AF_UNIX).connect(addr)
                print('reached', repr(addr))
            except OSError as e:
                print('refused', type(e).__name__)
    """)
    r = _run(code)
    for s in servers:
        s.close()
    assert r.ok and r.stdout.split() == ["refused", "FileNotFoundError", "refused", "ConnectionRefusedError"], r


def test_disabling_the_python_guard_still_leaves_no_process_creation():
    """The audit hook only words the refusal; the seccomp filter refuses underneath it."""
    code = textwrap.dedent("""
        import ctypes, sys
        sys.modules['__main__']._BLOCKED = ('x',)
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.fork(), ctypes.get_errno())
        print(libc.execv(b'/bin/true', None), ctypes.get_errno())
        print(libc.unshare(0x10000000), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), libc.chroot(b'/tmp'))
    """)
    r = _run(code)
    assert r.ok and r.stdout.split() == ["-1", "1", "-1", "1", "-1", "-1", "-1"], r
    for code in ("import os\nwhile True:\n    os.fork()", "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])",
                 "import multiprocessing as mp\np = mp.Process(target=print)\np.start()",
                 "import os\nos.system('echo hi')"):  # fmt: skip
        r = _run(code)
        assert not r.ok and r.reason == "blocked" and "hi" not in r.stdout, (code, r)


def test_host_files_and_environment_are_not_there(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("key")
    monkeypatch.setenv("SLIME_TEST_SECRET", "s3cr3t")
    code = textwrap.dedent(f"""
        import os
        print([os.path.exists(p) for p in ('/etc/shadow', {str(secret)!r}, os.path.expanduser('~root') + '/.ssh',
                                           '/run', '/var', '/home')])
        try:
            env = open('/proc/1/environ').read()
        except OSError:
            env = ''
        print('s3cr3t' in env or 'SLIME_TEST_SECRET' in os.environ)
        for path in ('/usr/evil', '/etc/evil', '/evil'):
            try:
                open(path, 'w')
                print('wrote', path)
            except OSError as e:
                print(e.errno)
    """)
    r = _run(code)
    assert r.ok, r
    lines = r.stdout.splitlines()
    assert lines[0] == str([False] * 6) and lines[1] == "False" and lines[2:] == ["30"] * 3, r.stdout
    r = _run("open('/tmp/big', 'wb').write(b'x' * (12 << 20))", tmp_mb=8)  # /tmp is bounded as a whole
    assert not r.ok and "No space left" in r.stderr, r


def test_parent_processes_cannot_be_signalled():
    code = textwrap.dedent(f"""
        import os, signal
        for attempt in (lambda: os.kill({os.getpid()}, 0),
                        lambda: signal.pidfd_send_signal(os.pidfd_open(1), signal.SIGKILL)):
            try:
                attempt()
                print('sent')
            except OSError as e:
                print(type(e).__name__)
    """)
    r = _run(code)
    assert r.ok and r.stdout.split() == ["ProcessLookupError", "PermissionError"], r


def test_limits_time_memory_and_output():
    r = _run("x = bytearray(2 * 1024**3)\nprint(len(x))", memory_mb=256)
    assert not r.ok and r.reason == "memory limit 256 MB"
    t0 = time.monotonic()
    r = _run("import os, time\nos.setsid()\nwhile True:\n    pass", timeout=2)
    assert not r.ok and r.reason.startswith(("timeout", "cpu")) and time.monotonic() - t0 < 5, r
    # an endless print is read as it comes, its middle dropped, and the run killed at the output limit
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    r = _run("while True:\n    print('x' * 1000)", timeout=30, max_output=4000, output_limit_mb=64)
    assert not r.ok and r.reason == "output limit 64 MB" and time.monotonic() - t0 < 25, r
    assert len(r.stdout) < 4100 and "bytes cut" in r.stdout
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 48 * 1024  # KiB: far below the 64 MB read
    assert _run("print(sum(range(10**6)))").stdout.strip() == str(sum(range(10**6)))  # and it still works


def _bare_copy() -> Path:
    """The sandbox's two files in a folder any user can read, for a run under another uid or interpreter."""
    folder = Path(tempfile.mkdtemp(prefix="slime-sbx-"))
    for name in ("sandbox.py", "sandbox_init.py"):
        shutil.copy(Path(sandbox.__file__).with_name(name), folder / name)
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


_PROBE = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from sandbox import run_python, SandboxUnavailable
    try:
        r = asyncio.run(run_python("import os\\nprint(os.getuid())\\nraise SystemExit(3)"))
        print('ran', r.stdout.strip(), r.reason, sorted(k for k, v in r.layers.items() if v.startswith('missing')))
    except SandboxUnavailable as e:
        print('refused', e)
""")


def test_an_unprivileged_user_gets_the_same_boundary_through_a_user_namespace():
    folder = _bare_copy()
    as_user = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"] if os.geteuid() == 0 else []
    try:  # the system interpreter: this one may live where uid 1000 cannot read
        out = subprocess.run([*as_user, "/usr/bin/python3", "-c", _PROBE, str(folder)], capture_output=True,
                             text=True, timeout=60, cwd="/")  # fmt: skip
    finally:
        shutil.rmtree(folder)
    assert out.stdout.split() == ["ran", "65534", "exit", "code", "3", "[]"], out


def test_a_kernel_without_namespaces_refuses_unless_weak_isolation_is_allowed():
    """Inside a user namespace that may create no further ones, with every capability dropped: the sandbox can set
    up neither namespaces nor the filesystem, so it refuses, naming what is missing and the flag that allows it."""
    folder = _bare_copy()
    jail = "echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --bounding-set -all --inh-caps -all"
    cmd = ["unshare", "-Ur", "sh", "-c", f'{jail} "$@"', "sh", sys.executable, "-c", _PROBE, str(folder)]
    try:
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
        allowed = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/",
                                 env={**os.environ, "SLIME_ALLOW_WEAK_SANDBOX": "1"})  # fmt: skip
    finally:
        shutil.rmtree(folder)
    assert refused.stdout.startswith("refused") and "namespaces: missing" in refused.stdout, refused
    assert "--allow-weak-sandbox" in refused.stdout and "weak isolation" in refused.stderr
    words = allowed.stdout.split()
    assert words[0] == "ran" and "'namespaces'" in allowed.stdout and "'filesystem'" in allowed.stdout, allowed
    assert "weak isolation" in allowed.stderr and "— refused" not in allowed.stderr


def test_an_interpreter_under_tmp_gets_the_whole_boundary(tmp_path):
    """The sandbox's new root is mounted over /tmp inside its namespace; an interpreter or virtual environment that
    lives below /tmp (a clone or venv there) used to vanish under it and the sandbox refused to run anything."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    assert str(venv).startswith(tempfile.gettempdir())
    result = _run("import sys; print(sys.prefix, 6 * 7)", python=str(venv / "bin" / "python"))
    assert result.ok and result.stdout.split()[1] == "42", result
    assert result.stdout.split()[0] == str(venv) and result.layers["filesystem"].startswith("read-only root")
