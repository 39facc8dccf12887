"""Calibration: how far the predicted probabilities are from the frequencies they claim, and temperature scaling.

    expected_calibration_error  15 equal-width bins of the top-1 confidence: sum over bins of
                                (bin size / N) x |accuracy - mean confidence| (Guo et al. 2017)
    nll                         mean -log p(true class)
    brier                       mean over images of sum over classes (p_k - [k == true])^2 (Brier 1950; 0 to 2)
    fit_temperature             the one scalar T minimising the NLL of softmax(logits / T) (L-BFGS on log T)
    reliability_diagram         per bin: its bounds, image count, mean confidence and accuracy

Dividing the logits by T > 0 keeps their order, so the predicted class (and the accuracy) never changes. The
temperature is fitted on val by the train stage and stored in the model (`Classifier.temperature`, in
model.json), so every way of predicting applies it; the evaluate stage reports these metrics on test before
(T = 1) and after.
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 15
CALIBRATION_METRICS = ("ece", "nll", "brier")
# Beyond these the fit has met a degenerate val set (all correct at probability 1, or one class only): a
# temperature outside them would only reflect that, so it is clamped.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def _probabilities_and_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probabilities {probs.shape} and labels {labels.shape} do not match")
    return probs, labels


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bins (lower, upper]: a confidence of exactly k/bins falls in bin k - 1; 0 in the first."""
    return np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)


def reliability_diagram(probs, labels, bins: int = BINS) -> list[dict]:
    """One row per bin of the top-1 confidence: lower, upper, count, confidence (mean), accuracy (None if empty)."""
    probs, labels = _probabilities_and_labels(probs, labels)
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    index = _bin_index(confidence, bins)
    rows = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        rows.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[inside].mean()) if count else None,
                "accuracy": float(correct[inside].mean()) if count else None,
            }
        )
    return rows


def expected_calibration_error(probs, labels, bins: int = BINS) -> float:
    """ECE over `bins` equal-width bins of the top-1 confidence (0 for no images)."""
    rows = reliability_diagram(probs, labels, bins)
    total = sum(row["count"] for row in rows)
    if total == 0:
        return 0.0
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"]))


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12: a 0 would be infinite)."""
    probs, labels = _probabilities_and_labels(probs, labels)
    if len(labels) == 0:
        return 0.0
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def brier(probs, labels) -> float:
    """Multi-class Brier score: mean over images of the squared distance to the one-hot label."""
    probs, labels = _probabilities_and_labels(probs, labels)
    if len(labels) == 0:
        return 0.0
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(1).mean())


def calibration_metrics(probs, labels, bins: int = BINS) -> dict[str, float]:
    return {
        "ece": expected_calibration_error(probs, labels, bins),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
    }


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=1).numpy()


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """The temperature T minimising the mean NLL of softmax(logits / T) on (logits, labels); 1.0 for no images.

    One scalar, fitted by L-BFGS on log T (T stays positive) in float64, starting at T = 1.
    """
    if len(labels) == 0:
        return 1.0
    # Gradients on, whatever the caller's mode (the logits often come from inference mode).
    with torch.inference_mode(False), torch.enable_grad():
        logits = torch.tensor(np.asarray(logits), dtype=torch.float64)
        labels = torch.tensor(np.asarray(labels), dtype=torch.int64)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not np.isfinite(temperature):
        return 1.0
    return float(np.clip(temperature, MIN_TEMPERATURE, MAX_TEMPERATURE))


def calibration_report(logits, labels, temperature: float, bins: int = BINS) -> dict:
    """ECE, NLL and Brier of softmax(logits) (`before`, T = 1) and softmax(logits / temperature) (`after`),
    with both reliability diagrams (`diagram_before`, `diagram_after`)."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": float(temperature),
        "before": calibration_metrics(before, labels, bins),
        "after": calibration_metrics(after, labels, bins),
        "diagram_before": reliability_diagram(before, labels, bins),
        "diagram_after": reliability_diagram(after, labels, bins),
    }


def reliability_frame(diagram: list[dict]):
    """A reliability diagram's non-empty bins as a DataFrame (the DVC plot's data: a plot cannot skip blanks):
    confidence (mean, the x), accuracy (the y), count, lower and upper bounds."""
    import pandas as pd

    rows = [row for row in diagram if row["count"]]
    return pd.DataFrame(rows, columns=["confidence", "accuracy", "count", "lower", "upper"])


def calibration_summary(calibration: dict) -> dict[str, float]:
    """metrics.json's `calibration`: the temperature and ECE, NLL, Brier on test before (T = 1) and after it."""
    return {
        "temperature": calibration["temperature"],
        **{f"{name}_{when}": calibration[when][name] for name in CALIBRATION_METRICS for when in ("before", "after")},
    }
