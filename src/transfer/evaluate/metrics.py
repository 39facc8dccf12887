"""Test metrics: accuracy, macro-F1, per-class recall and the confusion matrix (scikit-learn).

Per-class recall (the share of a class's images classified as that class) is called `recall` everywhere:
metrics.json, per_class.csv, the report and MLflow (`test.recall.<class>`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from tqdm import tqdm

from transfer.data.datasets import DeviceLoader
from transfer.pipeline.heap import release_free_heap


@torch.inference_mode()
def predict_logits_and_features(
    model: torch.nn.Module, dataset, batch_size: int, device: torch.device, tta: str = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of `model` (eval mode) over a dataset of (image, label), in order, on the CPU, and the pooled
    backbone features of the (unflipped) images, which the diagnostics compare with the pretrained ones.

    An `ImageDataset` of cached images is transformed on the device (its batch transform); other datasets
    (e.g. a TensorDataset of float images) are used as they are.

    tta="flip" scores each image and its horizontal mirror and returns the log of their mean softmax
    (fastai's and timm's flip test-time augmentation): valid logits, whose softmax is the averaged probability.

    A Classifier's logits are its head's, before its temperature (`model.calibrate(logits)` applies it).
    """
    if tta not in ("none", "flip"):
        raise ValueError(f"evaluate.tta: unknown test-time augmentation {tta!r}; choose 'none' or 'flip'")
    # Converted outside inference mode: parameters converted inside it could never take part in autograd again,
    # and the evaluate stage's Grad-CAM (transfer.evaluate.explain) runs on this model next.
    with torch.inference_mode(False):
        model.eval().to(device, memory_format=torch.channels_last)  # as in extract_features: about 2x on CPU
    loader = DeviceLoader(dataset, device, batch_size=batch_size, resident=False)
    batches, pooled = [], []
    for images, _ in tqdm(loader, desc="predict" if tta == "none" else "predict (flip TTA)", unit="batch"):
        images = images.contiguous(memory_format=torch.channels_last)
        # A Classifier (backbone + head) also gives its pooled features; any other module only logits.
        features = model.backbone(images) if hasattr(model, "backbone") else None
        logits = (model(images) if features is None else model.head(features)).float()
        if tta == "flip":
            # A Classifier's head, not its forward: the temperature applies after the views are averaged
            # (Classifier.calibrate), which keeps the averaged prediction's class.
            mirrored = model(images.flip(-1)) if features is None else model.head(model.backbone(images.flip(-1)))
            mirrored = mirrored.float()
            logits = ((logits.softmax(1) + mirrored.softmax(1)) / 2).log()
        batches.append(logits.cpu())
        if features is not None:
            pooled.append(features.float().cpu())
        release_free_heap()  # peak memory must not grow with the number of batches (pipeline.heap)
    return torch.cat(batches), (torch.cat(pooled) if pooled else None)


def predict_logits(
    model: torch.nn.Module, dataset, batch_size: int, device: torch.device, tta: str = "none"
) -> torch.Tensor:
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


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Confusion matrix (rows true, columns predicted) over all `n_classes`, scikit-learn's.

    Every class keeps its row and column even when absent from this test set, so matrices of different
    runs line up.
    """
    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class recall, keyed for DVC metrics and MLflow."""
    labels = list(range(len(classes)))
    matrix = confusion(y_true, y_pred, len(classes))
    recall = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "recall": {name: float(value) for name, value in zip(classes, recall)},
    }


def confusion_pairs(paths: list[str], y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per test image (actual, predicted class names): the input of DVC's confusion template."""
    return pd.DataFrame(
        {"path": paths, "actual": [classes[i] for i in y_true], "predicted": [classes[i] for i in y_pred]}
    )


def as_numpy(array) -> np.ndarray:
    """Accept a numpy array or a (possibly GPU) tensor."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1, support and one-vs-rest accuracy.

    `one_vs_rest_accuracy` is the binary accuracy of "is it this class?",
    (TP+TN)/N, high for any small class; the share of a class's own images
    classified right is its `recall` (the name metrics.json uses too).
    Classes never predicted or absent get 0 rather than a warning.
    """
    labels = np.arange(len(class_names))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class_cm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    correct = per_class_cm[:, 0, 0] + per_class_cm[:, 1, 1]
    accuracy = correct / max(len(y_true), 1)
    return pd.DataFrame(
        {
            "class": list(class_names),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support.astype(np.int64),
            "one_vs_rest_accuracy": accuracy,
        }
    )


def top_k_accuracies(y_true: np.ndarray, probs: np.ndarray, ks: Iterable[int] = (1, 3, 5)) -> dict[str, float]:
    """Top-k accuracy as `{"top{k}_accuracy": value}` for each k < classes.

    k >= number of classes is skipped: it is always 1 and says nothing.
    """
    probs = np.asarray(probs)
    n_classes = probs.shape[1]
    labels = np.arange(n_classes)
    # sklearn wants the positive-class score alone for two classes
    scores = probs[:, 1] if n_classes == 2 else probs
    return {
        f"top{k}_accuracy": float(top_k_accuracy_score(y_true, scores, k=k, labels=labels)) for k in ks if k < n_classes
    }


def most_confident_mistakes(y_true: np.ndarray, probs: np.ndarray, n: int = 16) -> np.ndarray:
    """Indices of up to `n` wrong predictions, most confident first."""
    probs = np.asarray(probs)
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != np.asarray(y_true))
    confidence = probs[wrong, y_pred[wrong]]
    # stable sort keeps test-set order among equal confidences: reproducible
    order = np.argsort(-confidence, kind="stable")
    return wrong[order][:n].astype(np.int64)
