"""The stage server runs a script as `python script.py` would, only without paying for the imports.

Real processes throughout: a server started with `python -m transfer.pipeline.stage_server start`, callers
launched with `python -m transfer.pipeline.stage`, compared with the same caller run cold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from project_helpers import PATIENCE_S

REPO_ROOT = Path(__file__).resolve().parents[2]

# Prints what a stage process can observe about itself; exits with the code given as argv[1].
PROBE = """
import json, os, sys
preloaded = "torch" in sys.modules
import transfer
payload = {"argv": sys.argv, "cwd": os.getcwd(), "marker": os.environ.get("MARKER"), "stdin": sys.stdin.read(),
           "preloaded": preloaded, "package": transfer.__file__, "name": __name__, "path0": sys.path[0]}
print(json.dumps(payload))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""

# Records its pid, then waits to be killed.
SLEEPER = """
import os, sys, time
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(3600)
"""


def environment(server_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFER_STAGE_SERVER", "PYTHONPATH")}
    env.update(TRANSFER_SERVER_DIR=str(server_dir), PYTHONPATH=str(REPO_ROOT / "src"), **extra)
    return env


def launch(script: Path, args: list[str], env: dict, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "transfer.pipeline.stage", str(script), *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )


def server_command(command: str, env: dict, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "transfer.pipeline.stage_server", command, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def gone(pid: int, within: float = PATIENCE_S) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running stage server in its own socket directory; stopped afterwards."""
    directory = tmp_path_factory.mktemp("server")
    env = environment(directory)
    assert "ready" in server_command("start", env, "--idle", "300")
    yield directory, env
    server_command("stop", env)


@pytest.fixture
def scripts(tmp_path) -> Path:
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    return tmp_path


def test_served_run_behaves_like_a_cold_run(server, scripts):
    _, env = server
    served = launch(scripts / "probe.py", ["3", "x"], {**env, "MARKER": "m1"}, scripts, stdin="input")
    cold = launch(
        scripts / "probe.py",
        ["3", "x"],
        {**env, "MARKER": "m1", "TRANSFER_STAGE_SERVER": "off"},
        scripts,
        stdin="input",
    )
    assert served.returncode == cold.returncode == 3
    assert served.stderr == cold.stderr == "to stderr\n"
    served_view, cold_view = json.loads(served.stdout), json.loads(cold.stdout)
    assert served_view.pop("preloaded") is True and cold_view.pop("preloaded") is False
    assert served_view == cold_view
    assert served_view["argv"] == [str(scripts / "probe.py"), "3", "x"]
    assert served_view["stdin"] == "input" and served_view["marker"] == "m1" and served_view["name"] == "__main__"
    assert int(re.search(r"(\d+) run\(s\) served", server_command("status", env)).group(1)) >= 1


def test_project_code_is_imported_from_the_callers_path(server, scripts, tmp_path):
    """A DVC temporary copy (or an edited checkout) runs its own package, not the one the server saw."""
    _, env = server
    copy = tmp_path / "copy"
    shutil.copytree(
        REPO_ROOT / "src" / "transfer", copy / "src" / "transfer", ignore=shutil.ignore_patterns("__pycache__")
    )
    done = launch(scripts / "probe.py", ["0"], {**env, "PYTHONPATH": str(copy / "src")}, scripts)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["preloaded"] is True
    assert view["package"] == str(copy / "src" / "transfer" / "__init__.py")


def test_a_different_import_time_environment_runs_cold(server, scripts):
    _, env = server
    other = "3" if env.get("OMP_NUM_THREADS") != "3" else "1"  # a thread count the server was not started with
    done = launch(scripts / "probe.py", ["0"], {**env, "OMP_NUM_THREADS": other}, scripts)
    assert done.returncode == 0 and json.loads(done.stdout)["preloaded"] is False


def test_killing_the_caller_kills_the_stage(server, scripts):
    _, env = server
    for signum in (signal.SIGKILL, signal.SIGTERM):
        pid_file = scripts / f"pid-{signum}"
        caller = subprocess.Popen(
            [sys.executable, "-m", "transfer.pipeline.stage", str(scripts / "sleeper.py"), str(pid_file)],
            cwd=scripts,
            env=env,
        )
        deadline = time.monotonic() + PATIENCE_S
        while not pid_file.exists() and caller.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert child != caller.pid  # it ran in the server's fork
        caller.send_signal(signum)
        assert caller.wait(timeout=PATIENCE_S) == -signum
        assert gone(child), f"stage process {child} outlived its caller ({signum!r})"


def test_server_exits_when_idle(tmp_path):
    env = environment(tmp_path / "idle")
    server_command("start", env, "--idle", "1")
    assert "serves this environment" in server_command("status", env)
    deadline = time.monotonic() + PATIENCE_S
    while "no stage server running" not in server_command("status", env) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "no stage server running" in server_command("status", env)
    assert not list((tmp_path / "idle").glob("*.sock"))


def test_without_a_server_the_launcher_runs_the_script_itself(scripts, tmp_path):
    env = environment(tmp_path / "none")
    done = launch(scripts / "probe.py", ["5"], env, scripts, stdin="")
    assert done.returncode == 5 and json.loads(done.stdout)["preloaded"] is False


# Prints the global RNGs' first draws and the temporary folder, as a stage would see them.
RNG_PROBE = """
import json, random, tempfile
import numpy, torch
print(json.dumps({"random": random.random(), "numpy": float(numpy.random.random()),
                  "torch": float(torch.rand(1)), "tmp": tempfile.gettempdir()}))
"""


def test_each_child_has_fresh_global_rngs_like_a_cold_process(server, scripts):
    _, env = server
    (scripts / "rng.py").write_text(RNG_PROBE)
    served = [json.loads(launch(scripts / "rng.py", [], env, scripts).stdout) for _ in range(2)]
    cold = json.loads(launch(scripts / "rng.py", [], {**env, "TRANSFER_STAGE_SERVER": "off"}, scripts).stdout)
    for generator in ("random", "numpy", "torch"):  # each seeded from the OS in a fresh process
        assert served[0][generator] != served[1][generator] != cold[generator]
    assert served[0]["tmp"] == cold["tmp"]


@pytest.mark.parametrize("variable", ["TMPDIR", "MPLCONFIGDIR", "HOME"])
def test_a_different_temporary_or_config_folder_runs_cold(server, scripts, tmp_path, variable):
    _, env = server
    done = launch(scripts / "probe.py", ["0"], {**env, variable: str(tmp_path)}, scripts)
    assert done.returncode == 0 and json.loads(done.stdout)["preloaded"] is False


def test_a_socket_folder_others_can_reach_is_refused(scripts, tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    env = environment(folder)
    refused = subprocess.run(
        [sys.executable, "-m", "transfer.pipeline.stage_server", "start"],
        env=env,
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )
    assert refused.returncode == 1 and "has mode 0o755" in refused.stderr and "chmod 700" in refused.stderr
    assert not list(folder.iterdir())
    done = launch(scripts / "probe.py", ["0"], env, scripts)  # the launcher will not use it either
    assert done.returncode == 0 and json.loads(done.stdout)["preloaded"] is False
    assert "has mode 0o755" in done.stderr and "running without it" in done.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_users_folder_and_connections_are_refused(scripts, tmp_path):
    nobody = 65534
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, nobody, nobody)
    refused = subprocess.run(
        [sys.executable, "-m", "transfer.pipeline.stage_server", "start"],
        env=environment(theirs),
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )
    assert refused.returncode == 1 and f"belongs to user id {nobody}" in refused.stderr

    mine = Path(tempfile.mkdtemp(prefix="transfer-server-test-", dir="/tmp"))  # reachable: pytest's tmp is 0700
    env = environment(mine)
    server_command("start", env, "--idle", "120")
    try:
        # Open the way to the socket (as a careless chmod would) for a process of another user.
        mine.chmod(0o711)
        socket_file = next(mine.glob("*.sock"))
        socket_file.chmod(0o777)
        marker = mine / "ran"
        (scripts / "touch.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the intruder: another user, connecting and asking for a run
            try:
                os.setgid(nobody)
                os.setuid(nobody)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(socket_file))
                data = json.dumps(
                    {
                        "command": "run",
                        "argv": [str(scripts / "touch.py")],
                        "cwd": "/",
                        "env": {},
                        "path": sys.path,
                        "fds": [],
                    }
                ).encode()
                sock.sendall(struct.pack("!I", len(data)) + data)
                os.write(write_end, repr(sock.recv(100)).encode())
            except BaseException as exc:  # noqa: BLE001 - reported through the pipe
                os.write(write_end, repr(exc).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        answer = os.read(read_end, 200)
        # Closed unanswered: seen as end of file, or as a reset/broken pipe when it closes first.
        assert answer == b"b''" or answer.startswith((b"ConnectionResetError", b"BrokenPipeError")), answer
        os.close(read_end)
        # The server logs the refusal when it decides; only then can nothing more happen to the marker.
        log = mine / (socket_file.stem + ".log")
        deadline = time.monotonic() + PATIENCE_S
        while f"refused a connection from user id {nobody}" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"refused a connection from user id {nobody}" in log.read_text()
        assert not marker.exists()
    finally:
        mine.chmod(0o700)
        server_command("stop", env)
        shutil.rmtree(mine, ignore_errors=True)


@pytest.mark.parametrize("stage", ["params", "download", "split"])
def test_light_stages_start_without_torch_or_mlflow(stage):
    """What a stage imports before main() runs: the data stages need neither torch nor MLflow."""
    check = (
        f"import runpy, sys; runpy.run_path({str(REPO_ROOT / 'stages' / (stage + '.py'))!r}, run_name='probe'); "
        "print(sorted(m for m in ('torch', 'mlflow', 'torchvision', 'timm') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_ctrl_c_of_a_served_stage_ends_it_with_one_line(server, scripts):
    _, env = server
    (scripts / "stage.py").write_text(
        "import time\nfrom transfer.pipeline.errors import run_stage\n\n"
        "def main():\n    print('working', flush=True)\n    time.sleep(3600)\n\nrun_stage('features', main)\n"
    )
    caller = subprocess.Popen(
        [sys.executable, "-m", "transfer.pipeline.stage", str(scripts / "stage.py")],
        cwd=scripts,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert caller.stdout.readline().strip() == "working"
    caller.send_signal(signal.SIGINT)
    _, err = caller.communicate(timeout=PATIENCE_S)
    assert caller.returncode == 130
    assert err.startswith("features: interrupted by Ctrl-C (SIGINT); no MLflow run was open; `dvc repro` resumes")
    assert len(err.strip().splitlines()) == 1
