"""Stage download: materialise the dataset named in params.yaml (`data:`) under data/raw/ and index it.

Every source (the archive committed in assets/ by default, an archive URL, a local folder, a labels CSV,
a torchvision dataset, IDX files) ends as image files under data/raw/ plus data/raw/index.csv
(path,label,subset) and data/raw/data_report.json (every skipped or ignored file, and why). Problems the
`data.policy` says to fail on stop the stage with a message naming the files; the README ("Bring your own data") has
a params example per source.
"""

from pathlib import Path

from transfer.data.sources import materialise, summary_line
from transfer.pipeline.errors import run_stage
from transfer.pipeline.layout import RAW_DIR
from transfer.pipeline.params import load_params


def main() -> None:
    params = load_params()
    index, report = materialise(params.data, RAW_DIR, Path.cwd())
    print(summary_line(index, report, RAW_DIR, Path.cwd()))


if __name__ == "__main__":
    run_stage("download", main)
