"""Long-tailed datasets: read the standard on-disk formats and cut the authors' LT split.

Why this module reads files itself: the project must run from the CIFAR python pickles and the
MNIST IDX files whatever their provenance (rebuilt CIFAR pickles have other MD5s, which
torchvision's ``CIFAR10`` class refuses), and the split must be exactly the authors' one, so the
whole path from bytes on disk to the uint8 tensors a trainer puts on the device is spelled out
here and tested against files written in the exact formats.

The long-tailed split (docs/DESIGN.md section 4), per class k = 0..C-1 in file order::

    n_max = N / C - val_per_class           (N, C: size and classes of the original train set)
    n_k   = round(n_max * rho ** (-k / (C - 1)))
    train = the first n_k images of class k, validation = the next val_per_class, test = the
            official (balanced) test set, unchanged.

Everything is returned as whole uint8 tensors (no Dataset/DataLoader) because trainers keep the
entire dataset resident on the device and augment with batched tensor ops (docs/DESIGN.md section 6).

This module is the entry point (:func:`load_dataset`, :func:`check_dataset`) and cuts the splits
read from the original files (the LT split above, the authors' pooled MNIST split); the pieces it
builds on live beside it and are importable from here too: the dataset object and the split
arithmetic (trainables/lt_dataset.py), the registry of sources (trainables/dataset_registry.py;
adding a dataset is one entry in ``DATASETS``) and the file-list split rule of mini-ImageNet
(trainables/list_split.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainables.dataset_registry import (
    DATASETS,
    DatasetSpec,
    DataSource,
    _canonical,
    _spec,
    dataset_info,
    dataset_names,
)
from trainables.errors import WbsweepError
from trainables.list_split import check_from_lists, load_from_lists
from trainables.lt_dataset import LTDataset, _check_rho, _is_int, _tensor, class_groups, data_fingerprint, lt_counts
from trainables.readers import Raw, default_data_root, read_idx, resolve_root

__all__ = [
    "DATASETS",
    "DataSource",
    "DatasetSpec",
    "LTDataset",
    "class_groups",
    "dataset_info",
    "dataset_names",
    "default_data_root",
    "load_dataset",
    "check_dataset",
    "data_fingerprint",
    "pooled_split",
    "lt_counts",
    "read_idx",
]


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    rho: float | None = None,
    val_per_class: int = 20,
    download: bool = True,
    split: str = "file",
) -> LTDataset:
    """Read a registered dataset and cut the long-tailed train / validation split.

    ``split`` "pooled" is the authors' MNIST protocol instead (:func:`pooled_split`); "file" is
    what follows.

    Per class k in file order: the first n_k images are train, the next ``val_per_class`` are
    validation, the rest of the class is unused; the test set is the official one, unchanged.
    n_max = N / C - val_per_class from the training file (CIFAR10: 4980, CIFAR100: 480,
    (Fashion-)MNIST: 5980); for digits, whose last 50 images per class are the test set, n_max is
    the smallest class's remaining count minus val_per_class (104). n_k is capped at
    (images of class k - val_per_class) so that the validation images always exist: this only
    bites on MNIST, whose classes are uneven (class 0 has 5,923 images, so n_0 = 5,903 instead
    of 5,980 at val 20).

    ``rho`` None takes the dataset's default (100 for the "-lt" names, 10 for digits-lt, 1 for the
    balanced names). ``data_root`` None takes ``$WBSWEEP_DATA_ROOT`` or ``~/.cache/wbsweep/data``.
    Missing files are downloaded into it through torchvision when ``download`` is true.
    Train, validation and test keep file order (train is sorted by position in the file).
    """
    spec = _spec(name)
    src = spec.source
    rho = spec.default_rho if rho is None else rho
    _check_rho(rho)
    if not _is_int(val_per_class) or val_per_class < 0:
        raise WbsweepError(f"val_per_class must be an integer >= 0, got {val_per_class!r}")
    val_per_class = int(val_per_class)
    if split not in SPLITS:
        raise WbsweepError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if split == "pooled" and (src.split_rule != "pool" or not src.needs_files or rho != 1):
        raise WbsweepError(f"{_canonical(name)}: split 'pooled' is the authors' balanced MNIST protocol: use it with "
                           "mnist or fashion-mnist at rho 1, or split 'file'")
    if src.split_rule == "lists":
        return load_from_lists(_canonical(name), src, resolve_root(data_root), rho)
    # Only datasets read from files look at the data root: a stale --data-root must not break digits.
    raw = src.read(resolve_root(data_root) if src.needs_files else Path(), download)
    if split == "pooled":
        return pooled_split(_canonical(name), src, raw)

    C = src.num_classes
    available = np.bincount(raw.y_pool, minlength=C)
    if src.n_max_rule == "mean":
        n_max = len(raw.y_pool) // C - val_per_class
    else:
        n_max = int(available.min()) - val_per_class
    if n_max < 1:
        raise WbsweepError(
            f"{_canonical(name)}: val_per_class={val_per_class} leaves no training images (n_max={n_max}); "
            "use a smaller val_per_class"
        )
    profile = lt_counts(n_max, C, rho)
    empty = [k for k, n in enumerate(profile) if n < 1]
    if empty:
        # A class without training images has prior 0 (log 0 in logit adjustment) and no recall
        # to speak of; refuse rather than silently train a C-1 class problem.
        raise WbsweepError(
            f"{_canonical(name)}: rho={rho:g} with n_max={n_max} leaves class {empty[0]} no training images "
            f"(n_k = round(n_max * rho^(-k/(C-1))) < 1); use a smaller rho or more images per class"
        )
    counts = [min(n, int(a) - val_per_class) for n, a in zip(profile, available, strict=True)]
    short = [k for k, n in enumerate(counts) if n < 1]
    if short:
        k = short[0]
        raise WbsweepError(
            f"{_canonical(name)}: class {k} has only {int(available[k])} training images, too few for "
            f"{val_per_class} validation images plus one training image; use a smaller val_per_class"
        )

    # Stable sort by label keeps file order inside each class, so a class's images are one slice.
    by_class = np.argsort(raw.y_pool, kind="stable")
    starts = np.concatenate([[0], np.cumsum(available)])
    train_parts, val_parts = [], []
    for k in range(C):
        members = by_class[starts[k]: starts[k + 1]]
        train_parts.append(members[: counts[k]])
        val_parts.append(members[counts[k]: counts[k] + val_per_class])
    train_pos = np.sort(np.concatenate(train_parts))
    val_pos = np.sort(np.concatenate(val_parts))

    return LTDataset(
        name=_canonical(name),
        x_train=_tensor(raw.x_pool[train_pos]),
        y_train=_tensor(raw.y_pool[train_pos]),
        x_val=_tensor(raw.x_pool[val_pos]),
        y_val=_tensor(raw.y_pool[val_pos]),
        x_test=_tensor(raw.x_test),
        y_test=_tensor(raw.y_test),
        num_classes=C,
        class_counts=counts,
        mean=src.mean,
        std=src.std,
        augment=src.augment,
        many_threshold=src.many_threshold,
        few_threshold=src.few_threshold,
        indices={
            "train": raw.pool_index[train_pos],
            "val": raw.pool_index[val_pos],
            "test": raw.test_index.copy(),
        },
    )


SPLITS = ("file", "pooled")
#: Test and validation images of the pooled split (the authors' MNIST_VALID_SAMPLE_N = 1000 * 10).
POOLED_HELD_OUT = 10_000


def pooled_split(key: str, src: DataSource, raw: Raw) -> LTDataset:
    """The authors' MNIST split (``utils/datasets.py``, ``set_mnist_dataset``): the training and test
    files pooled (70,000 images; positions 0..59,999 are the training file's, 60,000.. the test
    file's), then scikit-learn's ``train_test_split(..., test_size=10000, random_state=0,
    stratify=labels)`` draws the test set, and the same call on the rest draws the validation set;
    50,000 training images remain, every class in proportion. Normalisation: the authors' constants
    for this split where the source records them (MNIST: mean 0.1301, std 0.3069).

    The authors read ``mnist-original.mat``, whose image order is not the IDX files' order, so the
    procedure is theirs but the drawn images cannot be guaranteed to be the same ones. Each split
    keeps the order ``train_test_split`` returns."""
    from sklearn.model_selection import train_test_split

    x = np.concatenate([raw.x_pool, raw.x_test])
    y = np.concatenate([raw.y_pool, raw.y_test])
    if len(y) <= 2 * POOLED_HELD_OUT:
        raise WbsweepError(f"{key}: split 'pooled' needs more than {2 * POOLED_HELD_OUT} images, found {len(y)}")
    rest, test = train_test_split(np.arange(len(y)), test_size=POOLED_HELD_OUT, random_state=0, stratify=y)
    train, val = train_test_split(rest, test_size=POOLED_HELD_OUT, random_state=0, stratify=y[rest])
    mean, std = src.pooled_stats or (src.mean, src.std)
    return LTDataset(
        name=key, x_train=_tensor(x[train]), y_train=_tensor(y[train]), x_val=_tensor(x[val]),
        y_val=_tensor(y[val]), x_test=_tensor(x[test]), y_test=_tensor(y[test]), num_classes=src.num_classes,
        class_counts=np.bincount(y[train], minlength=src.num_classes).tolist(), mean=mean, std=std,
        augment=src.augment, many_threshold=src.many_threshold, few_threshold=src.few_threshold,
        indices={"train": train, "val": val, "test": test},
    )


def check_dataset(name: str, data_root: str | Path | None = None, rho: float | None = None,
                  val_per_class: int = 20, split: str = "file") -> str | None:
    """Fail as :func:`load_dataset` would (unknown name, missing or corrupt files, impossible
    split), without holding the images where that is costly: mini-ImageNet-LT's images (gigabytes)
    are only looked at through memory maps, and its fingerprint (returned; None for the other
    datasets, whose fingerprint needs the images: :func:`data_fingerprint`) comes from its lists."""
    spec = _spec(name)
    if spec.source.split_rule != "lists":
        load_dataset(name, data_root, rho, val_per_class=val_per_class, split=split)
        return None
    rho = spec.default_rho if rho is None else rho
    _check_rho(rho)
    return check_from_lists(_canonical(name), spec.source, resolve_root(data_root), rho)
