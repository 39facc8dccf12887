"""Where each stage reads and writes, relative to the repository root (dvc.yaml declares the same paths)."""

from pathlib import Path

PARAMS_OK_FILE = Path("data/params.ok")  # params: written once params.yaml validates; its bytes never change
PARAMS_CHECKED_FILE = Path("data/params.checked.json")  # params: the backbone values last resolved
RAW_DIR = Path("data/raw")  # download: the images, index.csv and data_report.json
INDEX_NAME = "index.csv"  # each image's path (relative to the repository root), label and subset
INDEX_COLUMNS = ["path", "label", "subset"]
DATA_REPORT_NAME = "data_report.json"  # every skipped or ignored file and why (transfer.data.report)
INDEX_FILE = RAW_DIR / INDEX_NAME
DATA_REPORT_FILE = RAW_DIR / DATA_REPORT_NAME
SPLIT_DIR = Path("data/split")  # split: train/val/test.csv, classes.json, summary.json
CACHE_DIR = Path("data/cache")  # cache: train/val/test.npy (uint8 [N, S, S, 3]) and meta.json
FEATURES_DIR = Path("data/features")  # features: train/val/test.pt
MODEL_DIR = Path("data/model")  # train: model.safetensors + model.json (transfer.models.saved)
HEAD_FILE = MODEL_DIR / "head.skops"  # a scikit-learn head (head.kind other than linear), without pickle
CHECKPOINT_DIR = Path("data/checkpoints")  # train: per-epoch checkpoints, kept across runs to resume
REPORTS_DIR = Path("reports")  # metrics (JSON) and plots (CSV), small files kept in git
DIAGNOSTICS_DIR = REPORTS_DIR / "diagnostics"  # evaluate: pictures, per-class CSV, report.html (DVC-cached)
LABEL_ISSUES_CSV = REPORTS_DIR / "label_issues.csv"  # label_issues: the labels that look wrong (kept in git)
LABEL_ISSUES_DIR = REPORTS_DIR / "label_issues"  # label_issues: the grid of the most suspect images (DVC-cached)
