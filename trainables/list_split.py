"""The file-list split rule (``split_rule: lists``, mini-ImageNet): a dataset prepared as lists.

trainables/mini_imagenet.py prepares the folder (the images decoded into arrays, one list file per
split); here the long-tailed training set is cut from it with TailCalibX's ``int()`` profile, the
prepared validation and test sets are kept unchanged, and the split's fingerprint comes from the
list files (the arrays are gigabytes), so a check need not read the images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from trainables import mini_imagenet as _mini
from trainables.dataset_registry import DataSource
from trainables.errors import WbsweepError
from trainables.lt_dataset import LTDataset, _tensor


def _lists_counts(key: str, y_train: np.ndarray, num_classes: int, rho: float) -> list[int]:
    """n_k of a prepared-lists dataset, or a one-line error when a class would get none."""
    n_max = int(np.bincount(y_train, minlength=num_classes).min())
    counts = _mini.lt_counts_int(n_max, num_classes, rho)
    if min(counts) < 1:
        raise WbsweepError(f"{key}: rho={rho:g} with {n_max} train images per class leaves class "
                           f"{counts.index(min(counts))} no training images; use a smaller rho")
    return counts


def _lists_fingerprint(folder: Path, counts: list[int]) -> str:
    """The fingerprint of a prepared-lists dataset: its list files (every image's source file and
    label, per split, in order), the long-tailed counts and the images' array shapes. The arrays
    themselves (gigabytes) are decoded from those files by one procedure, so they are not read."""
    h = hashlib.sha256(json.dumps(counts).encode())
    for name in ("classes.txt", *(f"{s}.txt" for s in _mini.SPLITS)):
        h.update((folder / name).read_bytes())
    for s in _mini.SPLITS:
        h.update(str(np.load(folder / f"images-{s}.npy", mmap_mode="r").shape).encode())
    return h.hexdigest()[:16]


def check_from_lists(key: str, src: DataSource, root: Path, rho: float) -> str:
    """What :func:`load_from_lists` would fail on (missing or corrupt files, a class left without
    training images), with the images only looked at through memory maps; returns the fingerprint."""
    folder = root / _mini.FOLDER
    splits = _mini.read_prepared(folder, key)
    counts = _lists_counts(key, splits["train"][1], src.num_classes, rho)
    return _lists_fingerprint(folder, counts)


def load_from_lists(key: str, src: DataSource, root: Path, rho: float) -> LTDataset:
    """mini-ImageNet(-LT) from a prepared folder (trainables/mini_imagenet.py): the first
    n_k = int(500 * (1/rho) ** (k / 99)) train images of class k in list order, the prepared
    validation and test sets unchanged."""
    splits = _mini.read_prepared(root / _mini.FOLDER, key)
    x_tr, y_tr = splits["train"]
    C = src.num_classes
    counts = _lists_counts(key, y_tr, C, rho)
    keep = np.concatenate([np.flatnonzero(y_tr == k)[:n] for k, n in enumerate(counts)])
    keep.sort()
    x_val, y_val = splits["val"]
    x_te, y_te = splits["test"]
    return LTDataset(
        name=key, x_train=_tensor(np.asarray(x_tr[keep])), y_train=_tensor(y_tr[keep]),
        x_val=_tensor(np.asarray(x_val)), y_val=_tensor(y_val), x_test=_tensor(np.asarray(x_te)),
        y_test=_tensor(y_te), num_classes=C, class_counts=counts, mean=src.mean, std=src.std,
        augment=src.augment, many_threshold=src.many_threshold, few_threshold=src.few_threshold,
        indices={"train": keep, "val": np.arange(len(y_val)), "test": np.arange(len(y_te))},
        fingerprint=_lists_fingerprint(root / _mini.FOLDER, counts),
    )
