"""Classification heads: the heads fitted on cached features (head.kind), and how the head starts
fine-tuning (finetune.head_init).

    probe     the weights of the head fitted on the cached features (head.kind linear or logreg; the other
              kinds fit a linear probe for this) (probe, then fine-tune: the pretrained features are not
              wrecked by a random head's large early gradients)
    xavier    random (Xavier-uniform weights, zero bias)
    imagenet  for each target class whose name matches an ImageNet category of the backbone (any of the
              category's comma-separated synonyms, case-insensitive; a class name like `T-shirt_top` is
              also tried part by part), the head row starts from the pretrained classifier's row;
              the other rows are Xavier
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from transfer.pipeline.errors import UserError
from transfer.pipeline.files import atomic_path


def xavier_head(head: nn.Linear, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = (6.0 / (head.in_features + head.out_features)) ** 0.5
        head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 * bound - bound)
        head.bias.zero_()


def imagenet_descriptions() -> list[str]:
    """The 1000 ImageNet-1k category descriptions in classifier order ("jersey, T-shirt, tee shirt")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(index) for index in range(1000)]


def _normalise(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def _candidates(class_name: str) -> list[str]:
    """The whole class name first, then its parts split on '_', '/' and ' '."""
    whole = _normalise(class_name)
    parts = [_normalise(part) for part in re.split(r"[_/ ]+", class_name) if part.strip()]
    return [whole] + [part for part in parts if part != whole]


def match_imagenet_classes(classes: list[str], descriptions: list[str]) -> dict[int, int]:
    """{target class index: ImageNet index} for the classes whose name is an ImageNet synonym."""
    synonyms: dict[str, int] = {}
    for index, description in enumerate(descriptions):
        for synonym in description.split(","):
            synonyms.setdefault(_normalise(synonym), index)  # the first category wins on shared synonyms
    matches = {}
    for target, name in enumerate(classes):
        for candidate in _candidates(name):
            if candidate in synonyms:
                matches[target] = synonyms[candidate]
                break
    return matches


def imagenet_overlap_head(
    head: nn.Linear, classes: list[str], classifier: nn.Linear | None, seed: int, descriptions: list[str] | None = None
) -> dict[str, str]:
    """Xavier head whose rows for ImageNet-matching classes are the pretrained classifier's; returns matches."""
    if classifier is None:
        raise ValueError(
            "finetune.head_init: imagenet needs the ImageNet classifier: set backbone.weights: "
            "imagenet, or use head_init: probe or xavier"
        )
    if classifier.in_features != head.in_features:
        raise ValueError(
            f"the ImageNet classifier takes {classifier.in_features} features but the head "
            f"{head.in_features}; use head_init: probe or xavier for this backbone"
        )
    descriptions = descriptions or imagenet_descriptions()
    xavier_head(head, seed)
    matches = match_imagenet_classes(classes, descriptions)
    with torch.no_grad():
        for target, source in matches.items():
            head.weight[target] = classifier.weight[source]
            head.bias[target] = classifier.bias[source]
    return {classes[target]: descriptions[source] for target, source in matches.items()}


# --- Heads on cached features (head.kind) -----------------------------------------------------------
#
#   linear  the AdamW linear probe (transfer.train.probe.train_linear_probe), a torch nn.Linear
#   logreg  multinomial logistic regression (L-BFGS), L2 strength 1/C chosen on val over a log grid
#           (Kornblith et al. 2019), then refitted on train + val
#   svm     a linear SVM (squared hinge, one-vs-rest, dual coordinate descent), C chosen on val, refitted
#           on train + val
#   knn     k-nearest neighbours on L2-normalised features (cosine), k chosen on val (DINO's protocol)
#   forest  a random forest (200 trees)
#   bayes   Gaussian naive Bayes
#
# Standardisation, where the head needs it, is a step of the fitted scikit-learn Pipeline, so the saved head
# takes raw cached features. Heads are stored with skops (no pickle) and loaded trusting only the types below.

LINEAR_PROBE = "linear"
# Kinds whose weights start fine-tuning (finetune.head_init: probe): softmax classifiers. The others (an SVM's
# hinge-loss scale is not a softmax's; knn, forest, bayes have no weights) start from a linear probe instead.
FINETUNE_INIT_KINDS = (LINEAR_PROBE, "logreg")


@dataclass(frozen=True)
class FeatureHead:
    build: Callable[[Any, int], Any]  # (hyperparameter value, seed) -> an unfitted sklearn Pipeline
    hyperparameter: str  # the value chosen on val ("-" when there is nothing to choose)
    grid: tuple  # values tried, in the order fitted (warm starts go from strong to weak regularisation)
    scores: str  # "decision": decision_function is the logits; "proba": log of predict_proba
    linear: bool  # logits = W x + b: can initialise fine-tuning


def _logreg(c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # warm_start: each C of the grid starts from the previous solution (the same estimator is refitted).
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300, warm_start=True, random_state=seed))


def _svm(c: float, seed: int):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    # The dual solver (coordinate descent), whatever the shape: on 54k x 1280 standardised features the primal
    # one (dual="auto" picks it when rows outnumber features) had not finished C = 1e-5 in 9 minutes, the dual
    # took 84 s. Its cost grows with C; tol 0.1 is liblinear's own default for this solver (scikit-learn's
    # 1e-4 is far stricter): at C = 1e-3, 83 passes over the data instead of 286 for the same val accuracy
    # (0.8828 vs 0.8827). max_iter bounds the weakly regularised fits, which the search on val reaches only
    # when they keep improving.
    return make_pipeline(StandardScaler(), LinearSVC(C=c, dual=True, tol=0.1, max_iter=200, random_state=seed))


def _knn(k: int, seed: int):
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    # Euclidean distance between L2-normalised vectors orders neighbours as the cosine similarity does.
    return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=k, weights="distance", algorithm="brute"))


def _forest(trees: int, seed: int):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline

    return make_pipeline(RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1))


def _bayes(smoothing: float, seed: int):
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import make_pipeline

    return make_pipeline(GaussianNB(var_smoothing=smoothing))


FEATURE_HEADS: dict[str, FeatureHead] = {
    # C from strong to weak regularisation, one value per decade (half-decade steps changed val accuracy by less
    # than its noise); the search stops after two values without improvement (train.probe.GRID_PATIENCE).
    "logreg": FeatureHead(_logreg, "C", tuple(10.0**k for k in range(-6, 3)), "decision", linear=True),
    "svm": FeatureHead(_svm, "C", tuple(10.0**k for k in range(-6, 1)), "decision", linear=True),
    "knn": FeatureHead(_knn, "k", (1, 3, 5, 10, 20, 50), "proba", linear=False),
    "forest": FeatureHead(_forest, "trees", (200,), "proba", linear=False),
    "bayes": FeatureHead(_bayes, "var_smoothing", (1e-9,), "proba", linear=False),
}
HEAD_KINDS = (LINEAR_PROBE, *FEATURE_HEADS)


def head_logits(estimator, features: np.ndarray, kind: str) -> np.ndarray:
    """[N, classes] scores whose softmax is the head's probability (decision values for the linear kinds)."""
    if FEATURE_HEADS[kind].scores == "decision":
        scores = estimator.decision_function(features)
        return np.stack([-scores / 2, scores / 2], 1) if scores.ndim == 1 else scores  # binary: one column
    return np.log(np.clip(estimator.predict_proba(features), 1e-12, None))


def fold_into_linear(estimator, kind: str, head: nn.Linear) -> None:
    """Copy a fitted linear kind (standardisation folded in) into `head`: the same logits from raw features."""
    if not FEATURE_HEADS[kind].linear:
        raise ValueError(f"head.kind {kind} is not a linear classifier")
    scaler, model = estimator[0], estimator[-1]
    weight = model.coef_ / scaler.scale_  # w . (x - mean) / scale + b = (w / scale) . x + (b - (w / scale) . mean)
    bias = model.intercept_ - weight @ scaler.mean_
    if weight.shape[0] == 1:  # binary: logits [-s/2, s/2] as head_logits gives them
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


class FittedHead(nn.Module):
    """A fitted scikit-learn head as the `head` of a Classifier: features in, logits out (inference only)."""

    def __init__(self, estimator, kind: str):
        super().__init__()
        self.estimator, self.kind = estimator, kind

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = head_logits(self.estimator, features.detach().float().cpu().numpy(), self.kind)
        return torch.as_tensor(logits, dtype=torch.float32, device=features.device)


# The only types a saved head may contain (skops refuses anything else: nothing in the file runs code).
TRUSTED_TYPES = [
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._data.Normalizer",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.neighbors._classification.KNeighborsClassifier",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "sklearn.naive_bayes.GaussianNB",
    "numpy.dtype",
    "numpy.float64",
    "numpy.int64",
]


class HeadFileError(UserError, ValueError):
    """A saved head is missing, unreadable, or holds types outside TRUSTED_TYPES."""


def save_feature_head(path: Path, estimator) -> None:
    """The fitted head as a skops file, atomically and byte-stably.

    skops names arrays and memoised objects by their id() in this process and stamps the zip entries with
    the time; both are renumbered in order of appearance and the timestamps fixed, so the same head gives
    the same bytes.
    """
    import io
    import zipfile

    import skops.io

    source = zipfile.ZipFile(io.BytesIO(skops.io.dumps(estimator)))
    schema = source.read("schema.json").decode("utf-8")
    numbers: dict[str, str] = {}

    def renumber(match: re.Match) -> str:
        number = numbers.setdefault(match.group(2), str(len(numbers)))
        return f"{match.group(1)}{number}{match.group(3)}"

    schema = re.sub(r'("__id__": )(\d+)()', renumber, schema)
    schema = re.sub(r'("file": ")(\d+)(\.npy")', renumber, schema)
    stamp = (1980, 1, 1, 0, 0, 0)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as target:
        target.writestr(zipfile.ZipInfo("schema.json", date_time=stamp), schema)
        renamed = sorted((int(numbers[name[:-4]]), name) for name in source.namelist() if name != "schema.json")
        for number, name in renamed:
            target.writestr(zipfile.ZipInfo(f"{number}.npy", date_time=stamp), source.read(name))


def load_feature_head(path: Path):
    import skops.io

    if not path.is_file():
        raise HeadFileError(f"{path} not found: run the train stage (dvc repro train)")
    try:
        untrusted = [name for name in skops.io.get_untrusted_types(file=path) if name not in TRUSTED_TYPES]
        if untrusted:
            raise HeadFileError(f"{path} holds types this project does not load: {untrusted}")
        return skops.io.load(path, trusted=TRUSTED_TYPES)
    except HeadFileError:
        raise
    except Exception as exc:  # truncated or edited file
        raise HeadFileError(f"{path} is not a readable skops head: {type(exc).__name__}: {exc}") from None
