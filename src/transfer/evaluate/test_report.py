"""What the evaluate stage computes on the test split and draws in the run report, as functions of values.

`test_logits` predicts the test split (from the cached features for a probe, from the images otherwise);
`write_report` writes the diagnostics folder (transfer.evaluate.diagnostics) with the train stage's reports,
the calibration and the label_issues stage's list beside it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from transfer.data.datasets import ImageDataset
from transfer.evaluate.diagnostics import write_run_diagnostics
from transfer.evaluate.metrics import predict_logits_and_features
from transfer.evaluate.plots import image_batch
from transfer.features import FeatureCache
from transfer.models.saved import SavedModel
from transfer.pipeline.files import read_json
from transfer.pipeline.params import DiagnosticsParams


def test_logits(
    saved: SavedModel, test: FeatureCache, images: ImageDataset, tta: str, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's logits on the test split before its temperature (see `SavedModel.model.calibrate`), and the
    fine-tuned backbone's test features (None for a probe, whose features are the cached pretrained ones)."""
    if not saved.fine_tuned and tta == "none":
        # The backbone is the untouched pretrained one: its test features are already cached.
        with torch.inference_mode():
            return saved.model.head(test.features), None
    head_logits, features = predict_logits_and_features(saved.model, images, batch_size, device, tta=tta)
    return head_logits, features if saved.fine_tuned else None


def layer_movement(path: Path) -> dict[str, float]:
    """Relative weight change per layer group, as the train stage measured it against its own theta0
    (reports/layer_movement.json; its nulls, groups where it is undefined, are left out)."""
    return {group: value for group, value in read_json(path).items() if value is not None}


def label_issues_section(issues_csv: Path, grid_dir: Path) -> tuple[int, list, list[Path]]:
    """The label_issues stage's list and grid: (count, report items, files to log).

    Its outputs are deps of this stage, so they are there and current; shown as they are, never acted on.
    """
    issues = pd.read_csv(issues_csv, keep_default_na=False)
    grids = sorted(grid_dir.glob("*.png"))
    note = (
        f"{len(issues)} training labels look wrong to a head that never saw them (out-of-fold confident learning). "
        f"Nothing was changed: check them in {issues_csv}, most suspect first, and fix the source if so."
    )
    return len(issues), [note, *grids, issues.head(10)], [issues_csv, *grids]


def write_report(
    out_dir: Path,
    reports_dir: Path,
    split_dir: Path,
    saved: SavedModel,
    diagnostics: DiagnosticsParams,
    test,
    images,
    logits: torch.Tensor,
    model_features,
    summary: dict,
    calibration: dict,
    label_items: list,
) -> tuple[dict, list[Path]]:
    """The run's diagnostics folder `out_dir`: pictures, per-class table, verdict (with what to try next) and
    report.html, from the train stage's reports in `reports_dir` and the split's summary; returns (metrics, files).

    The pictures show the test images as the image cache holds them (`images`: the test split's dataset).
    """
    row_of = {path: index for index, path in enumerate(images.paths)}

    def load_image(path: str) -> Image.Image:
        return Image.fromarray(images.images.read([row_of[path]])[0].permute(1, 2, 0).numpy())

    def transform(image: torch.Tensor) -> torch.Tensor:
        return images.batch_transform(image.unsqueeze(0))[0]

    def model_input(path: str) -> torch.Tensor:
        return images.batch_transform(images.images.read([row_of[path]]))[0]

    batch = image_batch(test.paths, load_image, transform, diagnostics.batch_size)
    selection = read_json(reports_dir / "train.json")
    return write_run_diagnostics(
        out_dir,
        class_names=saved.classes,
        y_true=test.labels.numpy(),
        probs=torch.softmax(logits.float(), dim=1).numpy(),
        history=pd.read_csv(reports_dir / "history.csv"),
        image_paths=test.paths,
        load_image=load_image,
        features=test.features,
        model=saved.model,
        batch=batch,
        weight_change=layer_movement(reports_dir / "layer_movement.json"),
        thresholds=diagnostics.thresholds(),
        best_epoch=selection["best_epoch"],
        summary={"accuracy": summary["accuracy"], "macro_f1": summary["macro_f1"]},
        title=f"Run report: {saved.backbone_name}, head {saved.head_kind}, freeze_layers={saved.freeze_layers}",
        projection=diagnostics.projection,
        max_mistakes=diagnostics.mistakes,
        model_features=model_features,
        selection=selection,
        train_counts=read_json(split_dir / "summary.json")["per_class"]["train"],
        calibration=calibration,
        model_input=model_input,
        mean=saved.data_config.mean,
        std=saved.data_config.std,
        gradcam_per_class=diagnostics.gradcam_per_class,
        extra_sections={"Labels that look wrong": label_items},
    )
