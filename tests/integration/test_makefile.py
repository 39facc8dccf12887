"""The Makefile passes user values to commands as arguments, never as shell code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_report_base_is_one_argument_not_shell_code(tmp_path):
    # The real Makefile in an empty folder, with a venv whose `transfer` records its arguments: what is under
    # test is how make and the shell hand BASE over. `-o` keeps make from ever running the setup (pip).
    shutil.copy2(REPO_ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").write_text("")
    recorder = venv / "bin" / "transfer"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, sys\nopen('argv.json', 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    recorder.chmod(0o755)
    hostile = "x; touch owned #"
    done = subprocess.run(
        ["make", "-o", f"{venv}/.installed", "report", f"VENV={venv}", f"BASE={hostile}"],
        cwd=tmp_path,
        env={**os.environ, "BASE": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "owned").exists()
    assert (tmp_path / "argv.json").read_text() == f'["report", "--base={hostile}"]'
