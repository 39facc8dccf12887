"""`transfer predict`: classify image files, folders and glob patterns with a trained model.

    transfer predict photos/ 'more/**/*.jpg' one.png --model data/model --top-k 3 --out predictions.csv

`--model` takes a model folder (the train stage's data/model), `runs:/<run_id>` (the model the train stage
logged in that MLflow run) or `models:/<name>@<alias>` (the registry, e.g. the `champion` that
`transfer promote` moves). Decoding and preprocessing are the evaluation's (transfer.evaluate.inference).
The output has one row per input: path, the top-k classes with their probabilities, and an error for any
input that could not be classified (unreadable, not an image, nothing matching a pattern); such inputs are
listed, never dropped, and make the exit status 1. `--explain DIR` also writes, for each classified image,
DIR/<position>_<name>.png: the image as the model saw it next to the Grad-CAM map of its predicted class
(transfer.evaluate.explain); nothing is written outside DIR.

Heavy imports (torch, pandas) happen inside the command, so `transfer --help` answers at once.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path
from typing import Sequence

from transfer.pipeline.errors import UserError

DEFAULT_MODEL = "data/model"


class PredictError(UserError, ValueError):
    """Bad arguments to predict: an unknown output format, a non-positive top-k or batch size."""


def collect_images(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns, in the order given.

    Returns (image paths, problems): an input matching nothing is a problem (input, message), reported like
    an unreadable image.
    """
    from transfer.data.images import is_image_file

    paths: list[str] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                problems.append((item, "folder without image files"))
            paths.extend(found)
        elif path.exists() or path.is_symlink():
            paths.append(item)  # named explicitly: tried whatever its extension
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file() and is_image_file(p))
            if not found:
                problems.append((item, "no image file matches this pattern"))
            paths.extend(found)
        else:
            problems.append((item, "no such file or folder"))
    unique = list(dict.fromkeys(paths))  # a file reached twice (a folder and a glob) is classified once
    return unique, problems


def predictions_frame(predictions: Sequence, classes: list[str], k: int):
    """One row per input: path, class_1, probability_1 ... class_k, probability_k, error (empty when none)."""
    import pandas as pd

    from transfer.evaluate.inference import top_k

    k = min(k, len(classes))
    rows = []
    for prediction in predictions:
        row: dict = {"path": prediction.source}
        ranked = top_k(prediction.probabilities, classes, k) if prediction.probabilities is not None else []
        for rank in range(k):
            name, probability = ranked[rank] if ranked else ("", float("nan"))
            row[f"class_{rank + 1}"], row[f"probability_{rank + 1}"] = name, probability
        row["error"] = prediction.error or ""
        rows.append(row)
    columns = ["path"] + [f"{kind}_{r + 1}" for r in range(k) for kind in ("class", "probability")] + ["error"]
    return pd.DataFrame(rows, columns=columns)


def predictions_json(predictions: Sequence, classes: list[str], k: int) -> list[dict]:
    """[{path, predictions: [{class, probability}, ...], error}] (error null when the image was classified)."""
    from transfer.evaluate.inference import top_k

    k = min(k, len(classes))
    return [
        {
            "path": p.source,
            "predictions": []
            if p.probabilities is None
            else [
                {"class": name, "probability": probability} for name, probability in top_k(p.probabilities, classes, k)
            ],
            "error": p.error,
        }
        for p in predictions
    ]


# A spreadsheet reads a cell starting with one of these as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """A text cell a spreadsheet shows as text: one starting like a formula gets a leading `'` (OWASP's
    escape), so a file named `=HYPERLINK(...).png` is not run when the CSV is opened."""
    return "'" + text if isinstance(text, str) and text.startswith(FORMULA_STARTS) else text


def predictions_csv_frame(predictions: Sequence, classes: list[str], k: int):
    """`predictions_frame` with its text cells (paths, class names, errors) made spreadsheet-safe."""
    frame = predictions_frame(predictions, classes, k)
    for column in frame.columns:
        if not column.startswith("probability_"):
            frame[column] = frame[column].map(spreadsheet_safe)
    return frame


def write_predictions(path: Path | None, predictions: Sequence, classes: list[str], k: int) -> None:
    """CSV or JSON by the file's extension; CSV on stdout without a path."""
    from transfer.pipeline.files import atomic_path, write_text

    if path is None:
        predictions_csv_frame(predictions, classes, k).to_csv(sys.stdout, index=False, float_format="%.6f")
        return
    suffix = path.suffix.lower()
    if suffix == ".json":
        write_text(path, json.dumps(predictions_json(predictions, classes, k), indent=2) + "\n")
    elif suffix == ".csv":
        with atomic_path(path) as tmp:
            predictions_csv_frame(predictions, classes, k).to_csv(tmp, index=False, float_format="%.6f")
    else:
        raise PredictError(f"--out {path}: unknown format {suffix!r}; use a .csv or .json file name")


# --- `transfer predict` ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise PredictError(f"--top-k must be at least 1 (got {args.top_k})")
    if args.out is not None and args.out.suffix.lower() not in (".csv", ".json"):
        raise PredictError(f"--out {args.out}: unknown format {args.out.suffix!r}; use a .csv or .json file name")
    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be at least 1 (got {args.batch_size})")
    from transfer.evaluate.inference import Prediction, predict_paths
    from transfer.pipeline.runtime import resolve_device
    from transfer.tracking import resolve_model

    paths, problems = collect_images(args.paths)
    saved = resolve_model(args.model)
    if args.explain is not None:
        from transfer.evaluate.explain import check_explainable

        check_explainable(saved.model)  # before the predictions: a model it cannot explain fails at once
    device = resolve_device(args.device)
    predictions = predict_paths(saved, paths, args.batch_size, device)
    predictions += [Prediction(source, None, message) for source, message in problems]
    write_predictions(args.out, predictions, saved.classes, args.top_k)
    if args.explain is not None:
        from transfer.evaluate.explain import explain_images

        classified = [(index, p.source) for index, p in enumerate(predictions) if p.error is None]
        written = explain_images(saved, classified, args.explain, device)
        print(f"predict: {len(written)} Grad-CAM overlay(s) -> {args.explain}", file=sys.stderr)
    failed = [p for p in predictions if p.error]
    where = f" -> {args.out}" if args.out else ""
    print(
        f"predict: {len(predictions) - len(failed)} image(s) classified with {args.model} on {device}{where}",
        file=sys.stderr,
    )
    if failed:
        print(f"predict: {len(failed)} input(s) could not be classified (listed with their error):", file=sys.stderr)
        for p in failed[:20]:
            print(f"  {p.source}: {p.error}", file=sys.stderr)
        return 1
    return 0


# The `transfer predict` command (transfer.cli builds its parser from these and `add_arguments`).
COMMAND = "predict"
COMMAND_HELP = "classify image files with a trained model"
COMMAND_DESCRIPTION = (
    "Classify images with the preprocessing of the evaluation; writes path, top-k classes and "
    "probabilities. Unreadable files are listed with their error (exit status 1)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, folders (searched recursively) or glob patterns (quote them: 'a/**/*.jpg')",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a model folder (default data/model), runs:/<run_id> or models:/<name>@<alias>",
    )
    parser.add_argument("--top-k", type=int, default=3, help="classes per image, most probable first (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="predictions.csv or .json (default: CSV on stdout)")
    parser.add_argument(
        "--explain",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write a Grad-CAM overlay PNG per classified image into DIR (created; nothing written outside it)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available (default)"
    )
