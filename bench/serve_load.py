"""The served model under a bounded hostile load, on loopback: latency of valid requests and the server's memory.

    python bench/serve_load.py                        # 200 requests from 4 clients (a few minutes on 2 cores)
    python bench/serve_load.py --requests 40 --clients 2

Logs a random-init efficientnet_lite0 classifier (224 px, the project's default backbone; the weights do not
change the cost) into a temporary MLflow store, serves it with `mlflow models serve --env-manager local` on
127.0.0.1, and sends JSON `dataframe_split` requests, one image each:

* valid: a 640 x 480 JPEG photo-like image (about 60 KB);
* bomb: an 8000 x 8000 PNG of about 60 KB that claims 64 MP (refused from its header: max_pixels);
* oversize: 10.5 MB of bytes (refused from the base64 length, before decoding: max_image_bytes).

The mix is 70 % valid, 20 % bomb, 10 % oversize, shuffled with a fixed seed. First a baseline: 20 valid
requests from one client with the server otherwise idle. Reported: p50 / p95 / max latency of the valid
requests (baseline and under load), that every hostile row got its error and every valid one a class, and
the peak of the server's summed RSS (the `mlflow models serve` process and its uvicorn worker, sampled every
0.1 s). Results go to bench/results/serve_load.json. Nothing is asserted: tests check the behaviour
(tests/integration/test_serving_http.py), this measures its cost.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent / "tests"), str(BENCH.parent / "src")]

from memory import tree_rss  # noqa: E402 - bench/memory.py
from serve_helpers import invoke, json_split, served_model  # noqa: E402 - tests/serve_helpers.py


def photo_jpeg(width: int = 640, height: int = 480) -> bytes:
    """Smooth gradients plus noise: compresses like a photo, not like a flat image."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, "PNG")
    return buffer.getvalue()


def log_model(store: Path) -> str:
    """A random-init efficientnet_lite0 classifier logged as the train stage logs it; returns its runs:/ URI."""
    import torch

    from transfer import tracking
    from transfer.evaluate.inference import model_input
    from transfer.models.backbones import Classifier, load_backbone
    from transfer.models.saved import load_model, save_model

    torch.manual_seed(0)
    loaded = load_backbone("efficientnet_lite0", "none")
    classes = ["cat", "dog", "fox"]
    model_dir = store / "model"
    model = Classifier(loaded.backbone, len(classes)).eval()
    save_model(
        model_dir, model, classes, loaded.data_config, backbone="efficientnet_lite0", weights="none", freeze_layers=0
    )
    saved = load_model(model_dir)
    photo = photo_jpeg()
    example = model_input(photo, saved.data_config).unsqueeze(0).numpy()
    os.environ["DVC_ROOT"] = str(store)
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(store)
    with tracking.training_run("serve-load", {}, {}) as run_id:
        tracking.log_model(model_dir, saved.model, photo, example)
    return f"runs:/{run_id}/model"


def percentiles(values: list[float]) -> dict[str, float]:
    return {
        "p50_s": round(float(np.percentile(values, 50)), 3),
        "p95_s": round(float(np.percentile(values, 95)), 3),
        "max_s": round(max(values), 3),
        "n": len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    bodies = {
        "valid": json_split([base64.b64encode(photo_jpeg()).decode()]),
        "bomb": json_split([base64.b64encode(bomb_png()).decode()]),
        "oversize": json_split([base64.b64encode(os.urandom(10_500_000)).decode()]),
    }
    kinds = ["valid"] * round(args.requests * 0.7) + ["bomb"] * round(args.requests * 0.2)
    kinds += ["oversize"] * (args.requests - len(kinds))
    random.Random(0).shuffle(kinds)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        uri = log_model(Path(tmp))
        with served_model(uri, log=Path(tmp) / "server.log") as (url, pid):
            idle_rss = tree_rss(pid)
            peak = [idle_rss]
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.wait(0.1):
                    peak[0] = max(peak[0], tree_rss(pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()

            def send(kind: str) -> tuple[str, float, bool]:
                start = time.perf_counter()
                status, reply = invoke(url, bodies[kind], "application/json")
                elapsed = time.perf_counter() - start
                (row,) = json.loads(reply)["predictions"] if status == 200 else [{"class": "", "error": reply}]
                answered = bool(row["class"]) if kind == "valid" else bool(row["error"]) and not row["class"]
                return kind, elapsed, answered and "Traceback" not in reply

            baseline = [send("valid") for _ in range(20)]
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(send, kinds))
            wall = time.perf_counter() - started
            sampling.set()
            sampler.join()

    under_load = [elapsed for kind, elapsed, _ in results if kind == "valid"]
    report = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}",
        "model": "efficientnet_lite0, random init, 224 px",
        "requests": args.requests,
        "clients": args.clients,
        "mix": {kind: kinds.count(kind) for kind in bodies},
        "all_answered_as_expected": all(ok for *_, ok in results + baseline),
        "valid_latency_baseline_1_client": percentiles([elapsed for _, elapsed, _ in baseline]),
        "valid_latency_under_load": percentiles(under_load),
        "wall_s": round(wall, 1),
        "server_rss_idle_mb": round(idle_rss / 2**20),
        "server_rss_peak_mb": round(peak[0] / 2**20),
    }
    out = BENCH / "results" / "serve_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
