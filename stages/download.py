"""Stage download: materialise the dataset named in params.yaml (`data:`) under data/raw/ and index it.

The default is the archive committed in assets/, checked against its sha256 and unpacked by the same
code that fetches an http(s) archive.
"""

from pathlib import Path

from transfer.data import index_image_folder
from transfer.fetch import fetch_archive
from transfer.files import write_csv
from transfer.layout import INDEX_FILE, RAW_DIR
from transfer.params import load_params


def main() -> None:
    params = load_params()
    fetch_archive(params.data.url, params.data.sha256, RAW_DIR)
    index = index_image_folder(RAW_DIR, Path.cwd())
    write_csv(INDEX_FILE, index)
    print(f"download: {len(index)} images in {index['label'].nunique()} classes -> {INDEX_FILE}")


if __name__ == "__main__":
    main()
