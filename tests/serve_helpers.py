"""A logged pyfunc model served for real: `mlflow models serve --env-manager local` on 127.0.0.1 (tests, bench)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
# A generous wait for start-up (importing torch and MLflow, loading the model) on a loaded machine: a limit
# for a server that never comes up, not a timing check.
START_LIMIT_S = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served_model(
    model_uri: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[tuple[str, int]]:
    """Serve `model_uri` until the block ends; yields (base URL, server pid) once /ping answers.

    `env` adds variables to the server's environment (e.g. SERVING_MODEL_CONFIG); its output goes to `log`
    (a file, so a chatty server never blocks on a full pipe)."""
    port = free_port()
    # uvicorn, which MLflow starts, is on the PATH of the environment's bin folder.
    server_env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT / "src"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    with open(log or os.devnull, "wb") as output:
        server = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)], env=server_env, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_LIMIT_S
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/ping", timeout=5):
                        break
                except OSError:
                    tail = log.read_text(errors="replace")[-3000:] if log else ""
                    assert server.poll() is None, f"the server exited:\n{tail}"
                    assert time.monotonic() < deadline, f"the server did not answer /ping:\n{tail}"
                    time.sleep(1)
            yield url, server.pid
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def invoke(url: str, body: bytes | str, content_type: str, timeout: float = 300) -> tuple[int, str]:
    """POST /invocations; (HTTP status, reply text), errors included."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def json_split(values: list) -> str:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[value] for value in values]}})
