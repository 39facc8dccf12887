"""The stage server: heavy libraries imported once, every stage run in a fresh fork of that process.

Each stage process pays for importing torch, torchvision, timm, MLflow, scikit-learn and matplotlib
(about 6 s on 2 cores) before it does any work. In a head-only `dvc exp run` that start-up is most of
the wall time: train and evaluate do about 3 s of work between them. The stage server imports those
libraries once and waits on a Unix socket. The dvc.yaml commands (`python -m transfer.pipeline.stage
stages/<name>.py`) hand it the script, arguments, working directory, environment and their own
stdin/stdout/stderr; the server forks a child that runs the script as `python stages/<name>.py` would,
and the exit status travels back. With no server running, the launcher runs the script itself.

What keeps a served run identical to a cold one:
- Only third-party modules come pre-imported. This project's package is imported afresh in every
  child from the caller's `sys.path`, so edited code and DVC's temporary experiment copies
  (`--temp`, `--queue`) run their own files.
- The server answers only callers whose interpreter, installed packages and import-time environment
  (thread counts, CUDA and PyTorch variables, the hash seed, temporary and config folders such as
  TMPDIR, HOME, XDG_*, MPLCONFIGDIR, the locale) match its own, see `fingerprint`; any other caller runs
  cold. The child also forgets the server's cached temporary folder.
- Each child reseeds the global RNGs of Python, NumPy and torch from the OS, as a fresh process does
  (forked children would otherwise all start from the server's state).
- The parent never computes. Libraries start a few idle native threads when imported (on the reference
  machine: one by torch, jemalloc's background thread via MLflow's pyarrow, OpenBLAS's pool via
  scikit-learn); only the forking thread exists in a child, and these libraries register fork handlers, so a
  child starts its own pools on first use. No Python thread runs in the parent.
- A child whose caller dies (`kill -9` of the stage) is killed with its process group, as the
  stage would have been. Signals the caller receives are forwarded to the child's group.

Who may talk to whom: the socket folder must be a real folder owned by the user with mode 0700 (the
server refuses to start, and callers refuse to use it, otherwise), and both ends check the other's user
id with SO_PEERCRED: a caller hands over its environment and terminal only to its own user's server, and
the server runs code only for its own user.

    python -m transfer.pipeline.stage_server start      # make server; exits after --idle seconds unused
    python -m transfer.pipeline.stage_server status
    python -m transfer.pipeline.stage_server stop

`TRANSFER_STAGE_SERVER=off` makes the launcher ignore a running server. `TRANSFER_SERVER_DIR` moves the
sockets (default `$XDG_RUNTIME_DIR/transfer-server`, else `/tmp/transfer-server-<uid>`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import hashlib
import importlib
import json
import logging
import os
import random
import runpy
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Imported once by the server: what the stages import, heaviest first.
PRELOAD = (
    "torch",
    "torchvision",
    "torchvision.transforms.v2",
    "timm",
    "mlflow",
    "mlflow.pytorch",
    "mlflow.store.tracking.sqlalchemy_store",
    "sklearn.metrics",
    "sklearn.decomposition",
    "sklearn.model_selection",
    "matplotlib.backends.backend_agg",
    "matplotlib.figure",
    "pandas",
    "numpy",
    "PIL.Image",
    "tqdm",
    "pydantic",
    "yaml",
    "threadpoolctl",
)
# This project's package: never kept in the server, always imported fresh by the child.
PROJECT_PACKAGE = (__package__ or "transfer").split(".")[0]
# Environment read when libraries load (OpenMP/MKL thread counts, CUDA, PyTorch, hash seed): a caller
# whose values differ from the server's would not get the same process, so it runs cold.
# Temporary, cache and config folders are read once too (tempfile caches TMPDIR; matplotlib its config and
# font cache), and so is the locale.
IMPORT_TIME_ENV = (
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "CUDA_",
    "PYTORCH_",
    "TORCH_",
    "NCCL_",
    "LD_",
    "PYTHONHASHSEED",
    "PYTHONOPTIMIZE",
    "PYTHONWARNINGS",
    "MPL",
    "TMPDIR",
    "TEMP",
    "TMP",
    "HOME",
    "XDG_",
    "LANG",
    "LC_",
    "TZ",
)
DEFAULT_IDLE_SECONDS = 30 * 60
UNIX_PATH_MAX = 107


class ServerError(RuntimeError):
    pass


# --- Where and whom the server serves ------------------------------------------------------------


def fingerprint() -> str:
    """What a process's imported libraries depend on; caller and server must agree on it."""
    site_packages = sorted({p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)})
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(IMPORT_TIME_ENV))
    blob = json.dumps(
        [
            sys.executable,
            sys.prefix,
            sys.version,
            list(sys.flags),
            env,
            [(p, os.stat(p).st_mtime_ns) for p in site_packages],
        ]
    )  # pip install touches these
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def server_dir() -> Path:
    if os.environ.get("TRANSFER_SERVER_DIR"):
        return Path(os.environ["TRANSFER_SERVER_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "transfer-server"
    return Path("/tmp") / f"transfer-server-{os.getuid()}"


def check_private_dir(path: Path) -> None:
    """Refuse a socket folder that someone else could use: it must be our own real folder, mode 0700."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise ServerError(f"{path} is not a folder (a symlink or a file); remove it or set TRANSFER_SERVER_DIR")
    if info.st_uid != os.getuid():
        raise ServerError(
            f"{path} belongs to user id {info.st_uid}, not to you ({os.getuid()}); "
            "set TRANSFER_SERVER_DIR to a folder of your own"
        )
    if info.st_mode & 0o077:
        raise ServerError(
            f"{path} has mode {oct(info.st_mode & 0o777)}: others could reach the stage server's "
            f"socket; chmod 700 {path}, or set TRANSFER_SERVER_DIR"
        )


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dir(path)


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (SO_PEERCRED: pid, uid, gid)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


def socket_path() -> Path:
    check_private_dir(server_dir())
    path = server_dir() / f"{fingerprint()}.sock"
    if len(str(path)) > UNIX_PATH_MAX:
        raise ServerError(
            f"socket path {path} is longer than {UNIX_PATH_MAX} characters: "
            "set TRANSFER_SERVER_DIR to a shorter directory"
        )
    return path


# --- Messages: 4-byte length, then JSON ----------------------------------------------------------


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    header = struct.pack("!I", len(data))
    if fds:
        socket.send_fds(sock, [header], fds)
        sock.sendall(data)
    else:
        sock.sendall(header + data)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message (None when the peer closed) and the file descriptors sent along with it."""
    if max_fds:
        header, fds, _, _ = socket.recv_fds(sock, 4, max_fds)
    else:
        header, fds = sock.recv(4), []
    if header and len(header) < 4:
        header += _recv_exactly(sock, 4 - len(header)) or b""
    if len(header) < 4:
        return None, fds
    data = _recv_exactly(sock, struct.unpack("!I", header)[0])
    return (json.loads(data) if data is not None else None), fds


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:  # no server, or a stale socket file left by a killed one
        sock.close()
        return None
    if peer_uid(sock) != os.getuid():  # not our server: it gets neither our environment nor our terminal
        sock.close()
        raise ServerError(f"the process listening on {path} belongs to another user; not using it")
    return sock


# --- The caller's side (python -m transfer.pipeline.stage) ------------------------------------------------


def run_script(script: str, args: list[str]) -> None:
    """Run a stage script in the matching server if one is up, else in this process; never returns."""
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` would have it
    sys.argv = [script, *args]
    if os.environ.get("TRANSFER_STAGE_SERVER", "on") != "off":
        code = run_in_server(script, args)
        if code is not None:
            _exit_like(code)
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def run_in_server(script: str, args: list[str]) -> int | None:
    """The script's exit code as run by the server; None when no server took it (run it yourself)."""
    try:
        sock = _connect(socket_path())
    except ServerError as exc:
        log.warning(f"stage server: {exc}; running without it")
        return None
    if sock is None:
        return None
    with sock:
        fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
        _send(
            sock,
            {
                "command": "run",
                "argv": [script, *args],
                "cwd": os.getcwd(),
                "env": dict(os.environ),
                "path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
                "fds": fds,
            },
            fds,
        )
        started, _ = _receive(sock)
        if started is None or "pid" not in started:
            return None  # refused before anything ran: safe to run cold
        child = started["pid"]
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda received, _frame: _signal_group(child, received))
        finished, _ = _receive(sock)
    if finished is None:
        log.error(
            f"stage server: lost the server while it ran {script} (see `python -m transfer.pipeline.stage_server "
            f"status`); run again, or set TRANSFER_STAGE_SERVER=off"
        )
        return 1
    return int(finished["exit"])


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _exit_like(code: int) -> None:
    """Exit with the child's status; a child killed by a signal kills this process the same way."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


# --- The server ----------------------------------------------------------------------------------


def preload() -> float:
    started = time.perf_counter()
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # an optional library missing only costs its import later
            importlib.import_module(name)
    _warm_mlflow_package_map()
    # Everything imported so far lives as long as the server: moved out of the collector's reach, a child's
    # garbage collections no longer walk (and copy-on-write) the libraries' millions of objects. This is what
    # Python's docs advise before forking workers (`gc.freeze`); served evaluate stages took 0.35 s less.
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


def _warm_mlflow_package_map() -> None:
    """Build MLflow's installed-package map once, in the server, instead of in every served train stage.

    MLflow checks a logged model's pip requirements against the environment through a map of every installed
    distribution's modules, built on first use by reading each distribution's file list: about a second
    here. It is a private function, so any failure only costs that second later.
    """
    with contextlib.suppress(Exception):
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()


def serve(idle_seconds: float) -> None:
    """Import the libraries, then run stage requests until idle for `idle_seconds` or SIGTERM."""
    _make_private_dir(server_dir())
    path = socket_path()
    if (existing := _connect(path)) is not None:
        existing.close()
        raise ServerError(f"a stage server already listens on {path}")
    seconds = preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    listener.bind(str(path))
    listener.listen(16)
    identity = os.stat(path).st_ino
    wake_read, wake_write = socket.socketpair()
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the wakeup fd
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    print(f"stage server {os.getpid()} ready on {path} (libraries imported in {seconds:.1f} s)", flush=True)

    children: dict[int, socket.socket] = {}
    served, last_active = 0, time.monotonic()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    server_sockets = [listener, wake_read, wake_write]
    try:
        while not stopping.is_set():
            timeout = None if children else max(0.0, last_active + idle_seconds - time.monotonic())
            events = selector.select(timeout)
            if not events and not children and time.monotonic() - last_active >= idle_seconds:
                print(f"stage server {os.getpid()}: idle for {idle_seconds:.0f} s, exiting", flush=True)
                break
            for key, _ in events:
                if key.fileobj is wake_read:
                    with contextlib.suppress(BlockingIOError):
                        wake_read.recv(4096)
                    continue
                conn, _ = listener.accept()
                if peer_uid(conn) != os.getuid():  # the folder is private; this is the second lock
                    print(f"stage server {os.getpid()}: refused a connection from user id {peer_uid(conn)}", flush=True)
                    conn.close()
                    continue
                pid = _handle(conn, children, server_sockets, stopping, served)
                if pid:  # only stage runs count as use; `status` does not keep the server alive
                    last_active = time.monotonic()
                    children[pid] = conn
                    served += 1
                else:
                    conn.close()
            for pid, code in _reap():
                last_active = time.monotonic()
                conn = children.pop(pid, None)
                if conn is not None:
                    with contextlib.suppress(OSError):
                        _send(conn, {"exit": code})
                    conn.close()
    finally:
        for child in children:
            _signal_group(child, signal.SIGTERM)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == identity:  # a newer server may have replaced ours
                path.unlink()
        print(f"stage server {os.getpid()}: stopped after {served} stage run(s)", flush=True)


def _reap() -> list[tuple[int, int]]:
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append((pid, os.waitstatus_to_exitcode(status)))


def _handle(
    conn: socket.socket, children: dict, server_sockets: list, stopping: threading.Event, served: int
) -> int | None:
    """Answer one request; for `run`, fork the child and return its pid."""
    conn.settimeout(10)  # a caller that connects and says nothing must not block the others
    try:
        request, fds = _receive(conn, max_fds=3)
    except (OSError, ValueError):
        return None
    conn.settimeout(None)
    if request is None:
        return None
    command = request.get("command")
    if command == "status":
        _send(conn, {"pid": os.getpid(), "running": len(children), "served": served})
        return None
    if command == "stop":
        stopping.set()
        _send(conn, {"pid": os.getpid()})
        return None
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # The child keeps only its own connection: not the listener, nor other stages' callers.
            others = server_sockets + [sock for sock in children.values() if sock is not conn]
            code = _run_child(conn, request, dict(zip(request["fds"], fds)), others)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    try:
        _send(conn, {"pid": pid})
    except OSError:
        _signal_group(pid, signal.SIGKILL)  # the caller is already gone
    return pid


def _run_child(conn: socket.socket, request: dict, fds: dict[int, int], inherited: list) -> int:
    """In the forked child: become the caller's stage process, run the script, return its exit code."""
    os.setpgid(0, 0)  # its own group: the caller forwards signals to it and to its helpers
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sock in inherited:
        sock.close()
    for target in (0, 1, 2):
        source = fds.pop(target) if target in fds else os.open(os.devnull, os.O_RDWR)
        os.dup2(source, target)
        if source != target:
            os.close(source)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # computed again from the caller's TMPDIR on first use
    _reseed()
    _rebind_stdio()
    sys.argv = list(request["argv"])
    sys.path[:] = request["path"]
    for name in [m for m in sys.modules if m == PROJECT_PACKAGE or m.startswith(PROJECT_PACKAGE + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    threading.Thread(target=_die_with_caller, args=(conn,), daemon=True).start()

    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        code = _system_exit_code(exc)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - as the interpreter would: print it, exit 1
        traceback.print_exc()
        code = 1
    # What the interpreter does on exit: wait for threads, run atexit (MLflow ends runs there), flush.
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _reseed() -> None:
    """The global RNGs as a fresh interpreter has them, not the server's state shared by every child."""
    random.seed()  # from os.urandom, as at interpreter start
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # from the OS, as at numpy's import
    if "torch" in sys.modules:
        sys.modules["torch"].seed()  # from the OS, as at torch's import


def _rebind_stdio() -> None:
    """Fresh text streams on fds 0-2, buffered as the caller's interpreter would buffer them."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = open(0, "r", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
    if unbuffered:
        sys.stdout.reconfigure(write_through=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _system_exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _die_with_caller(conn: socket.socket) -> None:
    """Block until the caller's end closes; if that happens first, the caller was killed: so are we."""
    with contextlib.suppress(OSError):
        while conn.recv(1024):
            pass
    os.killpg(0, signal.SIGKILL)


# --- start / stop / status -----------------------------------------------------------------------


def start(idle_seconds: float, wait_seconds: float = 120) -> int:
    _make_private_dir(server_dir())
    path = socket_path()
    if (sock := _connect(path)) is not None:
        sock.close()
        print(f"stage server already running on {path}")
        return 0
    log = path.with_suffix(".log")
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", f"{PROJECT_PACKAGE}.pipeline.stage_server", "serve", "--idle", str(idle_seconds)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(
                f"stage server failed to start (exit {process.returncode}); its log, {log}:\n{log.read_text()[-2000:]}",
                file=sys.stderr,
            )
            return 1
        if (sock := _connect(path)) is not None:
            sock.close()
            print(f"stage server {process.pid} ready on {path}; stops after {idle_seconds:.0f} s unused (log: {log})")
            return 0
        time.sleep(0.1)
    print(f"stage server not ready after {wait_seconds:.0f} s; see {log}", file=sys.stderr)
    return 1


def _ask(path: Path, command: str) -> dict | None:
    sock = _connect(path)
    if sock is None:
        return None
    with sock:
        _send(sock, {"command": command})
        reply, _ = _receive(sock)
    return reply


def status() -> int:
    check_private_dir(server_dir())
    sockets = sorted(server_dir().glob("*.sock")) if server_dir().is_dir() else []
    mine = socket_path()
    found = 0
    for path in sockets:
        reply = _ask(path, "status")
        if reply is None:
            continue
        found += 1
        serves = "serves this environment" if path == mine else "another environment (not used from here)"
        print(
            f"stage server {reply['pid']} on {path}: {serves}; {reply['served']} run(s) served, "
            f"{reply['running']} running"
        )
    if not found:
        print("no stage server running (start one: python -m transfer.pipeline.stage_server start)")
    return 0


def stop() -> int:
    check_private_dir(server_dir())
    sockets = sorted(server_dir().glob("*.sock")) if server_dir().is_dir() else []
    for path in sockets:
        reply = _ask(path, "stop")
        if reply is not None:
            print(f"stopped stage server {reply['pid']} ({path})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transfer.pipeline.stage_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "serve"):
        command = commands.add_parser(
            name, help="start in the background" if name == "start" else "run in the foreground"
        )
        command.add_argument(
            "--idle",
            type=float,
            default=DEFAULT_IDLE_SECONDS,
            help="exit after this many seconds without a stage run (default: %(default)s)",
        )
    commands.add_parser("status", help="list running servers")
    commands.add_parser("stop", help="stop every server in the socket directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            serve(args.idle)
            return 0
        return {"start": lambda: start(args.idle), "status": status, "stop": stop}[args.command]()
    except ServerError as exc:
        print(f"stage server: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
