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
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Prints what a stage process can observe about itself; exits with the code given as argv[1].
PROBE = '''
import json, os, sys
preloaded = "torch" in sys.modules
import transfer
payload = {"argv": sys.argv, "cwd": os.getcwd(), "marker": os.environ.get("MARKER"), "stdin": sys.stdin.read(),
           "preloaded": preloaded, "package": transfer.__file__, "name": __name__, "path0": sys.path[0]}
print(json.dumps(payload))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
'''

# Records its pid, then waits to be killed.
SLEEPER = '''
import os, sys, time
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
'''


def environment(server_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFER_STAGE_SERVER", "PYTHONPATH")}
    env.update(TRANSFER_SERVER_DIR=str(server_dir), PYTHONPATH=str(REPO_ROOT / "src"), **extra)
    return env


def launch(script: Path, args: list[str], env: dict, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transfer.pipeline.stage", str(script), *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def server_command(command: str, env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "transfer.pipeline.stage_server", command, *args], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def gone(pid: int, within: float = 10.0) -> bool:
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
    cold = launch(scripts / "probe.py", ["3", "x"], {**env, "MARKER": "m1", "TRANSFER_STAGE_SERVER": "off"},
                  scripts, stdin="input")
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
    shutil.copytree(REPO_ROOT / "src" / "transfer", copy / "src" / "transfer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = launch(scripts / "probe.py", ["0"], {**env, "PYTHONPATH": str(copy / "src")}, scripts)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["preloaded"] is True
    assert view["package"] == str(copy / "src" / "transfer" / "__init__.py")


def test_a_different_import_time_environment_runs_cold(server, scripts):
    _, env = server
    done = launch(scripts / "probe.py", ["0"], {**env, "OMP_NUM_THREADS": "1"}, scripts)
    assert done.returncode == 0 and json.loads(done.stdout)["preloaded"] is False


def test_killing_the_caller_kills_the_stage(server, scripts):
    _, env = server
    for signum in (signal.SIGKILL, signal.SIGTERM):
        pid_file = scripts / f"pid-{signum}"
        caller = subprocess.Popen([sys.executable, "-m", "transfer.pipeline.stage", str(scripts / "sleeper.py"),
                                   str(pid_file)], cwd=scripts, env=env)
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert child != caller.pid  # it ran in the server's fork
        caller.send_signal(signum)
        assert caller.wait(timeout=30) == -signum
        assert gone(child), f"stage process {child} outlived its caller ({signum!r})"


def test_server_exits_when_idle(tmp_path):
    env = environment(tmp_path / "idle")
    server_command("start", env, "--idle", "1")
    assert "serves this environment" in server_command("status", env)
    deadline = time.monotonic() + 30
    while "no stage server running" not in server_command("status", env) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "no stage server running" in server_command("status", env)
    assert not list((tmp_path / "idle").glob("*.sock"))


def test_without_a_server_the_launcher_runs_the_script_itself(scripts, tmp_path):
    env = environment(tmp_path / "none")
    done = launch(scripts / "probe.py", ["5"], env, scripts, stdin="")
    assert done.returncode == 5 and json.loads(done.stdout)["preloaded"] is False
