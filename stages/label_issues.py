"""Stage label_issues: the training images whose label looks wrong, most suspect first, for a person to check.

Reads the cached pretrained features of the training split (data/features/train.pt): out-of-fold probabilities
from k-fold logistic regressions, then confident learning (transfer.data.label_issues). Writes
reports/label_issues.csv (path, given label, suggested label, score) and a grid of the most suspect images
(reports/label_issues/suspects.png, drawn from the image cache), which the evaluate stage puts in the run report
and logs to the model's MLflow run. Nothing is removed or relabelled: the user decides.
"""

from pathlib import Path

from PIL import Image

from transfer.data import label_issues as issues
from transfer.data.cache import open_split
from transfer.data.split import read_classes
from transfer.evaluate.plots import plot_mistakes
from transfer.features import load_feature_cache
from transfer.pipeline.errors import run_stage
from transfer.pipeline.files import write_csv
from transfer.pipeline.layout import CACHE_DIR, FEATURES_DIR, LABEL_ISSUES_CSV, LABEL_ISSUES_DIR, SPLIT_DIR
from transfer.pipeline.params import load_params
from transfer.pipeline.runtime import single_threaded

SUSPECTS_PNG = LABEL_ISSUES_DIR / "suspects.png"


def draw_suspects(paths: list[str], ranking: issues.LabelRanking, labels, classes, shown: int) -> Path:
    """The `shown` most suspect images as the image cache holds them, titled given / suggested (its probability)."""
    rows = ranking.issues[:shown]
    pixels = open_split(CACHE_DIR, "train", paths).read(rows.tolist()) if len(rows) else []
    plot_mistakes(
        [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels],
        labels[rows],
        ranking.suggested[rows],
        ranking.suggested_prob[rows],
        classes,
        SUSPECTS_PNG,
        n=shown,
        title="Labels that look wrong, most suspect first (suggested: the out-of-fold class, its probability)",
        captions=("given", "suggested"),
        empty="no label looks wrong",
    )
    return SUSPECTS_PNG


@single_threaded()  # a thousand rows of features: extra BLAS threads would only spin-wait
def main() -> None:
    params = load_params()
    settings = params.label_issues
    classes = read_classes(SPLIT_DIR)
    train = load_feature_cache(FEATURES_DIR / "train.pt")
    labels = train.labels.numpy()
    folds = issues.fold_count(labels, settings.folds)
    if not settings.enabled or folds < 2:
        reason = "label_issues.enabled: false" if not settings.enabled else "a class has a single training image"
        write_csv(LABEL_ISSUES_CSV, issues.no_issues_table())
        plot_mistakes(
            [], [], [], [], classes, SUSPECTS_PNG, title="Labels that look wrong", empty=f"not checked: {reason}"
        )
        print(f"label_issues: not checked ({reason})")
        return
    if folds < settings.folds:
        print(f"label_issues: {folds} folds, not {settings.folds}: the smallest class has {folds} training images")
    ranking = issues.find_training_label_issues(train.features.numpy(), labels, folds, params.seed)
    write_csv(LABEL_ISSUES_CSV, issues.issues_table(ranking, train.paths, labels, classes))
    draw_suspects(train.paths, ranking, labels, classes, settings.max_shown)
    print(
        f"label_issues: {len(ranking.issues)} of {len(labels)} training labels look wrong -> {LABEL_ISSUES_CSV}, "
        f"{SUSPECTS_PNG}"
    )


if __name__ == "__main__":
    run_stage("label_issues", main)
