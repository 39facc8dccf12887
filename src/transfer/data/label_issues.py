"""Which training labels look wrong: out-of-fold probabilities on the cached features, then confident learning.

A head fitted on the very images it scores has memorised their labels, wrong ones included, so every image is
scored by a head that never saw it: stratified k-fold logistic regressions on the standardised pretrained
features (seconds on a CPU). Confident learning (cleanlab's `find_label_issues`, Northcutt et al. 2021) then
estimates, per pair of classes, how many labels were flipped and flags that many images whose out-of-fold
probability of their given label is lowest; every image is ranked by that probability, its label quality
(cleanlab's `self_confidence` score: near 0, the label looks wrong).

Nothing here changes the data: the ranking is a list for a person to check (`data.policy.label_issues` is about
structural problems of the source, never these).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

COLUMNS = ["path", "given_label", "suggested_label", "score"]
# Strong L2 (scikit-learn's C: the inverse weight of the penalty, which does not grow with the data, so larger
# data sets are regularised less). With ~1,000 images of 1,280 features a weakly regularised head is sure of
# everything, and a flipped label then looks no worse than a hard image: on the embedded data with 5% flipped
# labels the top 5% of the ranking held 69% of them at C=1 and 85% at C=0.003 (bench/label_issues.py, seed 0,
# with HEAD_C edited).
HEAD_C = 0.003


@dataclass(frozen=True)
class LabelRanking:
    """Every training image, most suspect first.

    `order`: row indices into the inputs, ranked by `scores` (ascending: the lowest label quality first);
    `scores`: the label-quality score of each input row; `suggested`: each row's most likely class out of fold,
    `suggested_prob` its probability; `flagged`: a boolean per input row, True where confident learning counts
    the label as an issue.
    """

    order: np.ndarray
    scores: np.ndarray
    suggested: np.ndarray
    suggested_prob: np.ndarray
    flagged: np.ndarray

    @property
    def issues(self) -> np.ndarray:
        """The flagged rows, most suspect first."""
        return self.order[self.flagged[self.order]]


def fold_count(labels: np.ndarray, folds: int) -> int:
    """`folds`, or fewer when a class has fewer training images: stratified folds must each hold some of it.

    Below 2, no image can be scored by a head that never saw it: the caller skips the check and says so.
    """
    return min(folds, int(np.bincount(labels)[np.unique(labels)].min()))


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """[N, C] probabilities, each row from a logistic regression fitted on the other folds (stratified)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_classes = int(labels.max()) + 1
    probs = np.zeros((len(labels), n_classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, score_rows in splitter.split(features, labels):
        head = make_pipeline(StandardScaler(), LogisticRegression(C=HEAD_C, max_iter=2000))
        head.fit(features[fit_rows], labels[fit_rows])
        # every class is in every fold's fit rows: fold_count keeps folds <= the smallest class
        probs[np.ix_(score_rows, head.classes_)] = head.predict_proba(features[score_rows])
    return probs


def rank_label_issues(probs: np.ndarray, labels: np.ndarray) -> LabelRanking:
    """Confident learning on out-of-fold `probs`: flag the likely wrong labels, rank every image."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scores = get_label_quality_scores(labels, probs, method="self_confidence")
    # n_jobs=1: a few thousand rows take milliseconds; worker processes would cost more than they save
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    # stable: ties keep the manifest order, so the CSV's bytes do not depend on the sort algorithm
    order = np.argsort(scores, kind="stable")
    return LabelRanking(
        order=order,
        scores=scores,
        suggested=probs.argmax(axis=1),
        suggested_prob=probs.max(axis=1),
        flagged=np.asarray(flagged, dtype=bool),
    )


def find_training_label_issues(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> LabelRanking:
    """The whole method: out-of-fold probabilities on the features (`folds` >= 2, see `fold_count`), then
    `rank_label_issues`."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return rank_label_issues(out_of_fold_probabilities(features, labels, folds, seed), labels)


def spreadsheet_safe(text: str) -> str:
    """A cell a spreadsheet shows as text, never runs as a formula (OWASP, "CSV Injection").

    File names come from whoever made the data set: one named `=HYPERLINK(...).png` would be a live formula in
    Excel or LibreOffice. OWASP's rule: a cell starting with = + - @, a tab or a carriage return gets a leading
    single quote (the CSV quoting of commas and quotes is pandas's).
    """
    return "'" + text if text.startswith(("=", "+", "-", "@", "\t", "\r")) else text


def issues_table(ranking: LabelRanking, paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str]):
    """The flagged images, most suspect first: path, given label, suggested label, score (6 decimals).

    The score is the out-of-fold probability of the given label: near 0, the label looks wrong.
    """
    rows = ranking.issues
    return pd.DataFrame(
        {
            "path": [spreadsheet_safe(paths[i]) for i in rows],
            "given_label": [class_names[int(labels[i])] for i in rows],
            "suggested_label": [class_names[int(ranking.suggested[i])] for i in rows],
            # fixed 6 decimals: the last bits of a BLAS sum may differ between machines; the CSV's bytes should not
            "score": [f"{float(ranking.scores[i]):.6f}" for i in rows],
        },
        columns=COLUMNS,
    )


def no_issues_table() -> pd.DataFrame:
    """The CSV's header alone (label_issues.enabled: false)."""
    return pd.DataFrame(columns=COLUMNS)


def precision_recall_at(ranking: LabelRanking, planted: np.ndarray, k: int) -> tuple[float, float]:
    """Of the `k` most suspect images, the share that were `planted` (precision) and of those the share found."""
    top = set(ranking.order[:k].tolist())
    hits = len(top & set(np.asarray(planted).tolist()))
    return hits / max(k, 1), hits / max(len(planted), 1)


def flip_labels(labels: np.ndarray, share: float, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `labels` with `share` of them moved to another class at random; (noisy labels, flipped rows)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    flipped = np.sort(rng.choice(len(labels), size=round(share * len(labels)), replace=False))
    noisy = labels.copy()
    # + 1..C-1 (mod C): always another class, each equally likely
    noisy[flipped] = (labels[flipped] + rng.integers(1, n_classes, size=len(flipped))) % n_classes
    return noisy, flipped
