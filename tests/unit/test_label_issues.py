"""Which training labels look wrong: out-of-fold confident learning finds planted label flips, and its CSV is safe.

The figure on real features (EfficientNet-Lite0 on the embedded Fashion-MNIST mini) is checked in
tests/test_pipeline.py, on the features its cold `dvc repro` leaves; bench/label_issues.py prints it for the README.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from transfer.data.label_issues import (
    COLUMNS,
    find_training_label_issues,
    flip_labels,
    fold_count,
    issues_table,
    no_issues_table,
    precision_recall_at,
    spreadsheet_safe,
)
from transfer.pipeline.files import write_csv

CLASSES = [f"class{i}" for i in range(10)]


def separable_features(per_class: int = 60, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten Gaussian clusters, well apart: a stand-in for pretrained features of an easy data set."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (10, dim))
    labels = np.repeat(np.arange(10), per_class)
    return centres[labels] + rng.normal(0, 1, (len(labels), dim)), labels


def test_the_top_five_percent_of_the_ranking_are_the_planted_flips():
    features, labels = separable_features()
    noisy, planted = flip_labels(labels, 0.05, 10, seed=1)
    assert len(planted) == 30 and (noisy[planted] != labels[planted]).all()
    assert (np.delete(noisy, planted) == np.delete(labels, planted)).all()

    ranking = find_training_label_issues(features, noisy, folds=5, seed=0)
    precision, recall = precision_recall_at(ranking, planted, k=len(planted))
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # the flagged images are the planted ones, and the suggested label is the one before the flip
    flagged = set(ranking.issues.tolist())
    assert len(flagged & set(planted.tolist())) >= 27 and len(flagged - set(planted.tolist())) <= 3
    found = [row for row in planted if row in flagged]
    assert (ranking.suggested[found] == labels[found]).mean() >= 0.9
    # most suspect first: scores ascend along the issues
    assert (np.diff(ranking.scores[ranking.issues]) >= 0).all()


def test_clean_labels_give_no_issues_and_the_same_ranking_twice():
    features, labels = separable_features(per_class=20)
    first = find_training_label_issues(features, labels, folds=3, seed=0)
    assert len(first.issues) == 0
    again = find_training_label_issues(features, labels, folds=3, seed=0)
    assert (first.order == again.order).all() and np.array_equal(first.scores, again.scores)


def test_folds_shrink_to_the_smallest_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    assert fold_count(labels, 5) == 3
    assert fold_count(np.array([0, 0, 1]), 5) == 1  # a single image: nothing can be scored out of fold
    assert fold_count(np.array([0] * 8 + [1] * 8), 5) == 5


def test_the_csv_escapes_formula_cells_and_reads_back(tmp_path):
    """A file name is user data: one starting with = + - @ must not be a live formula in a spreadsheet."""
    assert spreadsheet_safe('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert [spreadsheet_safe(name) for name in ("+1.png", "-2.png", "@a.png", "\tb.png", "\rc.png")] == [
        "'+1.png",
        "'-2.png",
        "'@a.png",
        "'\tb.png",
        "'\rc.png",
    ]
    assert spreadsheet_safe("data/raw/a=b.png") == "data/raw/a=b.png"  # only a leading character counts

    features, labels = separable_features(per_class=12, dim=8)
    noisy, planted = flip_labels(labels, 0.1, 10, seed=0)
    paths = [f"data/raw/img/{i}.png" for i in range(len(labels))]
    paths[planted[0]] = '=cmd|" /C calc"!A0,x.png'  # a hostile file name (comma and quotes included)
    ranking = find_training_label_issues(features, noisy, folds=3, seed=0)
    assert planted[0] in ranking.issues
    write_csv(tmp_path / "issues.csv", issues_table(ranking, paths, noisy, CLASSES))
    read = pd.read_csv(tmp_path / "issues.csv", keep_default_na=False, dtype=str)
    assert list(read.columns) == COLUMNS and len(read) == len(ranking.issues)
    hostile = read[read["path"].str.contains("calc")].iloc[0]
    assert hostile["path"] == "'" + paths[planted[0]]  # quoted by the CSV writer, neutralised by the quote
    assert hostile["given_label"] == CLASSES[noisy[planted[0]]]
    assert all(len(score.split(".")[1]) == 6 for score in read["score"])  # fixed decimals: byte-stable

    write_csv(tmp_path / "none.csv", no_issues_table())
    assert (tmp_path / "none.csv").read_text() == ",".join(COLUMNS) + "\n"
