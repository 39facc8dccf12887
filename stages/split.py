"""Stage split: stratified train/val/test manifests and the class list (`split:`, `samples_per_class`)."""

from pathlib import Path

from transfer.data.split import data_fingerprint, read_index, stratified_split, write_split
from transfer.pipeline.errors import run_stage
from transfer.pipeline.layout import INDEX_FILE, SPLIT_DIR
from transfer.pipeline.params import load_params


def main() -> None:
    params = load_params()
    index = read_index(INDEX_FILE)
    manifests = stratified_split(
        index, params.split.val_fraction, params.split.test_fraction, params.split.seed, params.samples_per_class
    )
    classes = sorted(index["label"].unique())
    counts = {split: frame["label"].value_counts().sort_index().to_dict() for split, frame in manifests.items()}
    summary = {
        "classes": len(classes),
        "images": {split: len(frame) for split, frame in manifests.items()},
        "per_class": counts,
        "data_hash": data_fingerprint(manifests, Path.cwd()),
    }
    write_split(SPLIT_DIR, manifests, classes, summary)
    print(f"split: {summary['images']} over {len(classes)} classes -> {SPLIT_DIR}")


if __name__ == "__main__":
    run_stage("split", main)
