"""Start-up of one sandboxed run; executed as a script (`python -I sandbox_init.py CONFIG REPORT_FD`), never imported.

Builds the boundary described in `slime.rollout.sandbox`, then reads the code from stdin and runs it. Process tree:
    launcher (host namespaces) -> init (pid 1 of a new PID namespace, reaps) -> runner (the code)
The launcher enters the new namespaces and builds the root filesystem; init mounts /proc and switches root; the
runner drops to an unprivileged user, installs the resource limits and the seccomp filter, reports which layers
hold on REPORT_FD (one JSON line), and runs the code. When init dies the kernel kills everything in its namespace,
and init dies with the launcher (PR_SET_PDEATHSIG), so killing the launcher's process group ends the whole tree.
"""

import ctypes
import json
import os
import platform
import signal
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x20000000, 0x40000000, 0x00010000
CLONE_NEWCGROUP = 0x02000000
NAMESPACE_FLAGS = (
    CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP
)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
NOBODY = 65534
EXIT_REFUSED = 97  # a required layer could not be set up: the code did not run

# Read-only views of the host: the system's programs and libraries, this interpreter's prefixes, a few /etc files
# that the loader and Python read. Nothing else of the host (home, /etc/shadow, sockets, /run, /var) exists inside.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "alternatives", "ssl",
             "mime.types")  # fmt: skip
DEVICES = ("null", "zero", "full", "random", "urandom")

# seccomp: syscalls that have no business in a tool run (other processes, mounts, namespaces, kernel state,
# io_uring, which bypasses seccomp). x86_64 and aarch64 numbers; the new mount API, pidfd and io_uring share them.
_COMMON = {"fsopen": 430, "fsconfig": 431, "fsmount": 432, "move_mount": 429, "open_tree": 428, "fspick": 433,
           "mount_setattr": 442, "pidfd_send_signal": 424, "pidfd_getfd": 438, "io_uring_setup": 425,
           "io_uring_enter": 426, "io_uring_register": 427}  # fmt: skip
SYSCALLS = {
    "x86_64": (0xC000003E, 56, 435, {**_COMMON, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "mount": 165, "umount2": 166,
        "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "kexec_load": 246, "kexec_file_load": 320,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "bpf": 321, "perf_event_open": 298,
        "keyctl": 250, "add_key": 248, "request_key": 249, "userfaultfd": 323, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179,
        "iopl": 172, "ioperm": 173, "settimeofday": 164, "clock_settime": 227, "adjtimex": 159,
        "clock_adjtime": 305, "syslog": 103}),
    "aarch64": (0xC00000B7, 220, 435, {**_COMMON, "execve": 221, "execveat": 281, "ptrace": 117,
        "process_vm_readv": 270, "process_vm_writev": 271, "mount": 40, "umount2": 39, "pivot_root": 41,
        "chroot": 51, "unshare": 97, "setns": 268, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "bpf": 280, "perf_event_open": 241, "keyctl": 219,
        "add_key": 217, "request_key": 218, "userfaultfd": 282, "open_by_handle_at": 265, "name_to_handle_at": 264,
        "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89, "quotactl": 60, "settimeofday": 170,
        "clock_settime": 112, "adjtimex": 171, "clock_adjtime": 266, "syslog": 116}),
}  # fmt: skip

libc = ctypes.CDLL(None, use_errno=True)


def _call(what: str, ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _call(f"mount {target}", libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_namespaces(layers: dict) -> str:
    """New mount, network, PID, IPC and UTS namespaces: as real root directly, otherwise inside a new user
    namespace where this user is root. Returns how ('root', 'userns') or '' when the kernel refused both."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid, errors = os.geteuid(), os.getegid(), []
    if uid == 0:
        if libc.unshare(flags) == 0:
            layers["namespaces"] = "mount, network, pid, ipc, uts"
            return "root"
        errors.append(f"unshare as root: {os.strerror(ctypes.get_errno())}")
    if libc.unshare(flags | CLONE_NEWUSER) == 0:
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/gid_map", f"0 {gid} 1")
        layers["namespaces"] = "user, mount, network, pid, ipc, uts"
        return "userns"
    errors.append(f"unshare with a user namespace: {os.strerror(ctypes.get_errno())}")
    layers["namespaces"] = "missing (" + "; ".join(errors) + ")"
    return ""


def _build_root(root: str, tmp_mb: int) -> None:
    """A tmpfs root holding read-only binds of the system and this interpreter, a private /tmp and minimal /dev."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    binds = [p for p in SYSTEM_DIRS if os.path.lexists(p)]
    binds += sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    binds += [f"/etc/{name}" for name in ETC_FILES if os.path.exists(f"/etc/{name}")]
    # what each source is, and a descriptor to it, taken before the new root covers `root`: a source below it (an
    # interpreter or virtual environment under /tmp) is then bound through /proc/self/fd, not its hidden path
    links = {p: os.readlink(p) for p in binds if os.path.islink(p)}
    dirs = {p for p in binds if p not in links and os.path.isdir(p)}
    fds = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in binds if p not in links}
    try:
        _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
        for path in binds:
            inside = root + path
            if path in links:
                os.makedirs(os.path.dirname(inside), exist_ok=True)
                if not os.path.lexists(inside):
                    os.symlink(links[path], inside)
                continue
            if os.path.lexists(inside) and os.path.ismount(inside):
                continue  # already visible through a parent bind (a prefix under /usr)
            if any(path.startswith(other + "/") for other in binds if other not in links):
                continue
            if path in dirs:
                os.makedirs(inside, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(inside), exist_ok=True)
                open(inside, "w").close()
            _mount(f"/proc/self/fd/{fds[path]}", inside, None, MS_BIND)
            _mount(None, inside, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    finally:
        for fd in fds.values():
            os.close(fd)
    _write(
        root + "/etc/passwd", f"root:x:0:0:root:/tmp:/bin/false\nnobody:x:{NOBODY}:{NOBODY}:nobody:/tmp:/bin/false\n"
    )
    _write(root + "/etc/group", f"root:x:0:\nnogroup:x:{NOBODY}:\n")
    for name in ("proc", "tmp", "dev"):
        os.makedirs(f"{root}/{name}", exist_ok=True)
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,mode=1777")
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID, "size=64k,mode=0755")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{root}/dev/{name}")


def _switch_root(root: str, layers: dict) -> None:
    """Mount /proc of the new PID namespace, then make the built tree the root and detach the host's."""
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV)
    _mount(None, root + "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    nr = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
    if nr is not None and libc.syscall(nr, b".", b".") == 0:
        _call("umount old root", libc.umount2(b".", MNT_DETACH))
        layers["filesystem"] = "read-only root, private /tmp"
    else:
        _call("chroot", libc.chroot(b"."))
        layers["filesystem"] = "read-only root (chroot), private /tmp"
    os.chdir("/")


def _drop_user(mode: str, layers: dict) -> None:
    """Become an unprivileged user: setuid to nobody as real root, a nested user namespace otherwise (the
    capabilities left there apply to nothing of the outer namespaces)."""
    if mode == "root" or (not mode and os.geteuid() == 0):
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        layers["user"] = f"uid {NOBODY}"
    elif mode == "userns":
        _call("unshare user", libc.unshare(CLONE_NEWUSER))
        _write("/proc/self/uid_map", f"{NOBODY} 0 1")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/gid_map", f"{NOBODY} 0 1")
        layers["user"] = f"uid {NOBODY} in a nested user namespace"
    else:
        layers["user"] = f"missing (runs as uid {os.geteuid()})"


def _seccomp(layers: dict) -> None:
    """A BPF filter: no new processes (threads are fine), no exec, no namespaces, mounts, tracing or kernel
    state. The runner can never regain privileges (no_new_privs)."""
    _call("no_new_privs", libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    table = SYSCALLS.get(platform.machine())
    if table is None:
        layers["seccomp"] = f"missing (no syscall table for {platform.machine()})"
        return
    arch, nr_clone, nr_clone3, denied = table
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    allow, kill = 0x7FFF0000, 0x80000000
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if platform.machine() == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # the x32 ABI's aliases
    prog += [(jeq, 0, 5, nr_clone), (ld, 0, 0, 16), (jset, 2, 0, NAMESPACE_FLAGS), (jset, 0, 1, CLONE_THREAD),
             (ret, 0, 0, allow), (ret, 0, 0, eperm)]  # fmt: skip
    prog += [(jeq, 0, 1, nr_clone3), (ret, 0, 0, enosys)]  # libc falls back to clone, checked above
    for nr in sorted(denied.values()):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog.append((ret, 0, 0, allow))
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog)
    _call("seccomp", libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fbuf, 0, 0))
    layers["seccomp"] = f"{len(denied) + 4} syscalls refused; threads only, no exec"


def _limits(cfg: dict, layers: dict) -> None:
    import resource

    mem = cfg["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_mb"] << 20, cfg["file_mb"] << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    layers["limits"] = f"{cfg['memory_mb']} MB address space, {cfg['cpu_seconds']} s CPU, files ≤ {cfg['file_mb']} MB"


def _audit_messages() -> None:
    """Clear messages for what the filter refuses anyway (os.system otherwise just returns -1)."""
    blocked = ("subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn")

    def hook(event: str, args: tuple) -> None:
        if event.startswith(blocked):
            raise PermissionError(f"sandbox: {event} is not allowed (no new processes)")

    sys.addaudithook(hook)


def _run_code(cfg: dict, mode: str, layers: dict, report_fd: int) -> None:
    for name, setup in (("user", lambda: _drop_user(mode, layers)), ("limits", lambda: _limits(cfg, layers)),
                        ("seccomp", lambda: _seccomp(layers))):  # fmt: skip
        try:
            setup()
        except OSError as e:
            layers[name] = f"missing ({e})"
    missing = [k for k, v in layers.items() if v.startswith("missing")]
    os.write(report_fd, (json.dumps({"layers": layers, "missing": missing}) + "\n").encode())
    os.close(report_fd)
    if missing and cfg["require"]:
        os._exit(EXIT_REFUSED)
    _audit_messages()
    os.chdir("/tmp" if layers["filesystem"].startswith("read-only") else cfg["workdir"])
    code = sys.stdin.read()
    try:
        exec(compile(code, "<tool>", "exec"), {"__name__": "__main__"})
    except SystemExit:
        raise
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "<tool>":
            tb = tb.tb_next  # the model sees its own frames only
        import traceback

        traceback.print_exception(type(e), e, tb)
        sys.stderr.flush()
        os._exit(1)


def main() -> None:
    cfg, report_fd = json.loads(sys.argv[1]), int(sys.argv[2])
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the launcher re-raises the runner's fatal signal
    layers: dict[str, str] = {}
    mode = _enter_namespaces(layers)
    root = "/tmp"  # mounted over only inside the new mount namespace
    if not mode:
        layers["filesystem"] = "missing (no mount namespace)"
    else:
        try:
            _build_root(root, cfg["tmp_mb"])
        except OSError as e:
            layers["filesystem"] = f"missing ({e})"
    built = "filesystem" not in layers
    status_r, status_w = os.pipe()
    init = os.fork()
    if init == 0:  # pid 1 of the new PID namespace (or a plain child without namespaces)
        os.close(status_r)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        try:
            if built:
                _switch_root(root, layers)
        except OSError as e:
            layers["filesystem"] = f"missing ({e})"
        runner = os.fork()
        if runner == 0:
            os.close(status_w)
            try:
                _run_code(cfg, mode, layers, report_fd)
            except SystemExit as e:
                code = e.code
                if code is not None and not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
            except BaseException:
                import traceback

                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        os.close(report_fd)
        os.close(0)
        status = os.waitpid(runner, 0)[1]  # retried across signals (PEP 475)
        os.write(status_w, str(status).encode())
        os._exit(0)
    os.close(status_w)
    os.close(report_fd)
    os.close(0)
    os.waitpid(init, 0)
    raw = os.read(status_r, 64)
    status = int(raw) if raw else signal.SIGKILL  # init killed: report as killed
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


if __name__ == "__main__":
    main()
