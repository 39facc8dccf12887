"""Test metrics: accuracy, macro-F1, per-class recall and the confusion matrix (scikit-learn).

Per-class recall (the share of a class's images classified as that class) is called `recall` everywhere:
metrics.json, per_class.csv, the report and MLflow (`test.recall.<class>`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from tqdm import tqdm

from transfer.data.datasets import DeviceLoader


@torch.inference_mode()
def predict_logits_and_features(model: torch.nn.Module, dataset, batch_size: int, device: torch.device,
                                tta: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of `model` (eval mode) over a dataset of (image, label), in order, on the CPU, and the pooled
    backbone features of the (unflipped) images, which the diagnostics compare with the pretrained ones.

    An `ImageDataset` of cached images is transformed on the device (its batch transform); other datasets
    (e.g. a TensorDataset of float images) are used as they are.

    tta="flip" scores each image and its horizontal mirror and returns the log of their mean softmax
    (fastai's and timm's flip test-time augmentation): valid logits, whose softmax is the averaged probability.
    """
    if tta not in ("none", "flip"):
        raise ValueError(f"evaluate.tta: unknown test-time augmentation {tta!r}; choose 'none' or 'flip'")
    model.eval().to(device, memory_format=torch.channels_last)  # as in extract_features: about 2x on CPU
    loader = DeviceLoader(dataset, device, batch_size=batch_size, resident=False)
    batches, pooled = [], []
    for images, _ in tqdm(loader, desc="predict" if tta == "none" else "predict (flip TTA)", unit="batch"):
        images = images.contiguous(memory_format=torch.channels_last)
        # A Classifier (backbone + head) also gives its pooled features; any other module only logits.
        features = model.backbone(images) if hasattr(model, "backbone") else None
        logits = (model(images) if features is None else model.head(features)).float()
        if tta == "flip":
            mirrored = model(images.flip(-1)).float()
            logits = ((logits.softmax(1) + mirrored.softmax(1)) / 2).log()
        batches.append(logits.cpu())
        if features is not None:
            pooled.append(features.float().cpu())
    return torch.cat(batches), (torch.cat(pooled) if pooled else None)


def predict_logits(model: torch.nn.Module, dataset, batch_size: int, device: torch.device,
                   tta: str = "none") -> torch.Tensor:
    """The logits of `predict_logits_and_features`."""
    return predict_logits_and_features(model, dataset, batch_size, device, tta)[0]


def macro_f1_from_confusion(matrix) -> float:
    """Macro-F1 from a confusion matrix (rows true, columns predicted), as scikit-learn's
    `f1_score(average="macro", labels=all classes, zero_division=0)`: F1_c = 2TP / (2TP + FP + FN)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = matrix.diagonal()
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # (TP + FP) + (TP + FN)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1.mean()) if len(f1) else 0.0


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class recall, keyed for DVC metrics and MLflow."""
    labels = list(range(len(classes)))
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    recall = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "recall": {name: float(value) for name, value in zip(classes, recall)},
    }


def confusion_pairs(paths: list[str], y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per test image (actual, predicted class names): the input of DVC's confusion template."""
    return pd.DataFrame({"path": paths, "actual": [classes[i] for i in y_true],
                         "predicted": [classes[i] for i in y_pred]})
