"""Speed of the everyday loop, measured on a fresh copy of the repository.

    python bench/pipeline_speed.py                 # all three figures
    python bench/pipeline_speed.py --skip-finetune # only cold repro and the head-only change

Figures (wall-clock seconds, this machine): a cold `dvc repro` on the embedded default, a head-only
change through `dvc exp run -S head.lr=...` (which must re-run neither download, split nor features)
with every stage process starting cold and then with a stage server running (`make server`: the
libraries are imported once, each stage runs in a fork of that process), and `dvc exp run -S
freeze_layers=3` with the default epochs. Head-only runs are repeated (`--repeat`) and the median kept.
Results are printed and written to bench/results/pipeline_speed.json. Nothing here is asserted: tests
check behaviour, this measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from project_copy import (  # bench/project_copy.py (bench/ is on sys.path when run as a script)
    bench_environment,
    copy_project,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], cwd: Path, env: dict) -> tuple[float, list[str]]:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed, re.findall(r"Running stage '(\w+)'", done.stdout + done.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="head-only runs per mode (median reported)")
    args = parser.parse_args()

    env = bench_environment(TRANSFER_STAGE_SERVER="off")
    dvc = [sys.executable, "-m", "dvc"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="transfer-bench-") as tmp:
        repo = Path(tmp)
        copy_project(repo)
        for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
            subprocess.run(command, cwd=repo, env=env, check=True)

        seconds, stages = timed(dvc + ["repro"], repo, env)
        results["cold_repro"] = {"seconds": round(seconds, 1), "stages": stages, "target_s": 60}
        subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
        subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, env=env, check=True)

        learning_rates = iter(f"{0.02 + 0.001 * i:.3f}" for i in range(2 * args.repeat))

        def head_only(mode_env: dict) -> dict:
            runs = [
                timed(dvc + ["exp", "run", "-S", f"head.lr={next(learning_rates)}"], repo, mode_env)
                for _ in range(args.repeat)
            ]
            return {
                "seconds": round(statistics.median(s for s, _ in runs), 1),
                "runs_s": [round(s, 1) for s, _ in runs],
                "stages": runs[-1][1],
                "target_s": 10,
            }

        results["head_only_exp_run_cold"] = head_only(env)
        # Sockets outside the repository: DVC would otherwise see them as untracked files.
        server_env = {**env, "TRANSFER_STAGE_SERVER": "on", "TRANSFER_SERVER_DIR": tempfile.mkdtemp(prefix="ts-")}
        seconds, _ = timed([sys.executable, "-m", "transfer.pipeline.stage_server", "start"], repo, server_env)
        results["stage_server_start"] = {"seconds": round(seconds, 1)}
        try:
            results["head_only_exp_run_served"] = head_only(server_env)
        finally:
            subprocess.run([sys.executable, "-m", "transfer.pipeline.stage_server", "stop"], cwd=repo, env=server_env)

        if not args.skip_finetune:
            seconds, stages = timed(dvc + ["exp", "run", "-S", "head.lr=0.01", "-S", "freeze_layers=3"], repo, env)
            results["finetune_k3_exp_run"] = {"seconds": round(seconds, 1), "stages": stages, "target_s": 180}
            metrics = json.loads((repo / "reports" / "metrics.json").read_text())
            results["finetune_k3_exp_run"]["test_accuracy"] = metrics["accuracy"]

    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    out = REPO_ROOT / "bench" / "results" / "pipeline_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for name, result in results.items():
        print(f"{name:22s} {result}")


if __name__ == "__main__":
    main()
