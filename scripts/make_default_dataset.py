"""Build the embedded default dataset: a stratified Fashion-MNIST subset as a PNG ImageFolder archive.

The archive ships in git (assets/) so that a fresh clone runs the whole pipeline offline. It is made
from the official Fashion-MNIST files as packaged by Debian (`apt-get install dataset-fashion-mnist`):

    python scripts/make_default_dataset.py            # writes assets/fashion-mnist-mini.tar.gz
    python scripts/make_default_dataset.py --per-class 150 --seed 0

The same seed and count always give the same bytes (sorted members, fixed mtimes, no gzip timestamp),
so the sha256 in params.yaml stays valid until someone changes the recipe on purpose.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# The class list (in the official label order) and the IDX reader are the data package's.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from transfer.data.sources import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, read_idx  # noqa: E402

FASHION_MNIST_DIR = Path(DEBIAN_FASHION_MNIST)
ARCHIVE_ROOT = "fashion-mnist-mini"
LICENSE_NOTICE = """\
Fashion-MNIST subset
====================
Images: Fashion-MNIST, Copyright (c) 2017 Zalando SE, https://github.com/zalandoresearch/fashion-mnist
Licensed under the MIT License:

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE
USE OR OTHER DEALINGS IN THE SOFTWARE.

This subset holds {per_class} images per class drawn with seed {seed} from the official training split,
made by scripts/make_default_dataset.py.
"""


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed, so the archive is byte-for-byte reproducible
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--out", type=Path, default=Path("assets/fashion-mnist-mini.tar.gz"))
    args = parser.parse_args()

    images = read_idx(args.source / "train-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(args.seed)

    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(
            tar, f"{ARCHIVE_ROOT}/LICENSE.txt", LICENSE_NOTICE.format(per_class=args.per_class, seed=args.seed).encode()
        )
        for label, class_name in enumerate(FASHION_MNIST_CLASSES):
            chosen = np.sort(rng.choice(np.flatnonzero(labels == label), args.per_class, replace=False))
            for index in chosen:
                add_bytes(tar, f"{ARCHIVE_ROOT}/{class_name}/{index:05d}.png", png_bytes(images[index]))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(tar_buffer.getvalue())
    tmp.replace(args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), sha256 {digest}")


if __name__ == "__main__":
    main()
