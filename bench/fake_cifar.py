"""Write random images in the exact CIFAR python-pickle format, for checks on machines without
the real data (the GPU check): `python bench/fake_cifar.py DEST [--classes 100]`.

Pixels are random, so accuracies mean nothing; shapes, file format, the long-tailed split and the
timings are those of the real dataset (500 train and 100 test images per class, like CIFAR-100;
5000/1000 per class with --classes 10, like CIFAR-10).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def write(dest: Path, classes: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    per_train, per_test = (500, 100) if classes == 100 else (5000, 1000)

    def split(per: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.permutation(np.repeat(np.arange(classes), per))
        return rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), labels.tolist()

    if classes == 100:
        folder = dest / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, per in (("train", per_train), ("test", per_test)):
            x, y = split(per)
            with open(folder / name, "wb") as fh:
                pickle.dump({b"data": x, b"fine_labels": y, b"coarse_labels": [0] * len(y)}, fh)
    else:
        folder = dest / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        x, y = split(per_train)
        for i in range(5):
            part = slice(i * 10000, (i + 1) * 10000)
            with open(folder / f"data_batch_{i + 1}", "wb") as fh:
                pickle.dump({b"data": x[part], b"labels": y[part]}, fh)
        x, y = split(per_test)
        with open(folder / "test_batch", "wb") as fh:
            pickle.dump({b"data": x, b"labels": y}, fh)
    return folder


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dest", type=Path)
    p.add_argument("--classes", type=int, default=100, choices=[10, 100])
    args = p.parse_args()
    print(write(args.dest, args.classes))
