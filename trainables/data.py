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

Adding a dataset is one entry in ``DATASETS`` (plus a ``DataSource`` if it reads a new format).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables import mini_imagenet as _mini
from trainables.errors import WbsweepError
from trainables.readers import (
    DIGITS_MEAN,
    DIGITS_STD,
    Raw,
    default_data_root,
    read_cifar,
    read_digits,
    read_idx,
    read_mnist_like,
    resolve_root,
)

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



# --------------------------------------------------------------------------------------------------
# The dataset object and the split arithmetic
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class LTDataset:
    """A long-tailed dataset held in memory as whole tensors, ready to be moved to a device at once.

    Images stay uint8 (N, C, H, W) so that a full CIFAR set costs 150 MB rather than 600 MB on the
    device; the trainer normalises with ``mean``/``std`` (in [0, 1] pixel units) after augmenting.
    ``eq=False`` because comparing tensors field by field has no single truth value.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_counts: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    many_threshold: int
    few_threshold: int
    #: Position of every image of each split ("train", "val", "test") in its source: the training
    #: file for train/val and the test file for test (for digits, all three index the one
    #: ``load_digits`` array). Kept for provenance and to prove the splits are disjoint; optional
    #: so code that builds an LTDataset by hand need not fill it.
    indices: dict[str, np.ndarray] = field(default_factory=dict)
    #: :func:`data_fingerprint` of the split, once computed ("" until then).
    fingerprint: str = ""

    def groups(self) -> list[str]:
        """"many" / "medium" / "few" per class, from the training counts (for group accuracies)."""
        return class_groups(self.class_counts, self.many_threshold, self.few_threshold)

    @property
    def prior(self) -> np.ndarray:
        """Training label distribution pi_k (float64), the prior that post-hoc logit adjustment uses."""
        counts = np.asarray(self.class_counts, dtype=np.float64)
        return counts / counts.sum()

    def __repr__(self) -> str:
        # Tensor reprs would flood logs; sizes and the head/tail counts say what matters.
        return (
            f"LTDataset({self.name!r}, classes={self.num_classes}, image={tuple(self.x_train.shape[1:])}, "
            f"train={len(self.y_train)} (n_0={self.class_counts[0] if self.class_counts else 0}, "
            f"n_last={self.class_counts[-1] if self.class_counts else 0}), val={len(self.y_val)}, "
            f"test={len(self.y_test)})"
        )


def lt_counts(n_max: int, num_classes: int, rho: float) -> list[int]:
    """Training images per class of the exponential long-tailed profile.

    n_k = round(n_max * rho ** (-k / (C - 1))) with Python's ``round`` (banker's rounding on the
    float), as in the authors' code: CIFAR100 (n_max 480, rho 100) gives 480, 458, 437, ..., 5
    (10,457 in all). ``int()`` instead (the WB repository) would give a different split.
    """
    _check_rho(rho)
    if not _is_int(num_classes) or num_classes < 1:
        raise WbsweepError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not _is_int(n_max) or n_max < 0:
        raise WbsweepError(f"n_max (images of the largest class) must be an integer >= 0, got {n_max!r}")
    num_classes, n_max = int(num_classes), int(n_max)
    if num_classes == 1:
        return [n_max]
    return [round(n_max * rho ** (-k / (num_classes - 1))) for k in range(num_classes)]


def class_groups(counts: Sequence[int], many_threshold: int, few_threshold: int) -> list[str]:
    """Many-/Medium-/Few-shot label per class: Many if n_k > many, Few if n_k < few, else Medium.

    Strict inequalities on both sides, as in the LT literature (CIFAR100: Many > 100, Few < 20,
    so a class with exactly 100 or exactly 20 images is Medium).
    """
    if few_threshold > many_threshold:
        raise WbsweepError(
            f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold}); fix the spec"
        )
    return ["many" if n > many_threshold else "few" if n < few_threshold else "medium" for n in counts]


def _is_int(value: Any) -> bool:
    """Python and numpy integers (counts often come out of numpy), but not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_rho(rho: Any) -> None:
    """rho < 1 would make the tail larger than the head: reject it before any file is read."""
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho < 1:
        raise WbsweepError(
            f"imbalance ratio rho must be a finite number >= 1 (1 = balanced, 100 = CIFAR-LT), got {rho!r}"
        )


@dataclass(frozen=True)
class DataSource:
    """How to obtain one original dataset and the constants that belong to it (not to the split).

    ``n_max_rule`` says where n_max comes from: "mean" is N/C - val (the authors' rule, for
    balanced originals); "min" is the smallest class minus val (digits, whose classes differ in
    size, so that every class can supply n_max images).
    """

    title: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    many_threshold: int
    few_threshold: int
    description: str
    read: Callable[[Path, bool], Raw]
    needs_files: bool = True
    n_max_rule: str = "mean"
    #: "pool": cut train/val from the training file (above); "lists": prepared split lists with
    #: their own validation and test sets and TailCalibX's int() profile (mini-ImageNet).
    split_rule: str = "pool"
    #: Normalisation (mean, std) the authors used with their pooled split (``split: pooled``), if
    #: it differs from ``mean``/``std``; None: the same constants.
    pooled_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: a source plus the default imbalance ratio (1 = the balanced dataset)."""

    source: DataSource
    default_rho: float


# --------------------------------------------------------------------------------------------------
# Sources and the registry
# --------------------------------------------------------------------------------------------------

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_MNIST_MD5 = (
    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "d53e105ee54ea40749a09fcbcd1e9432",
    "9fb629c4189551a2d022fa330f9573f3",
    "ec29112dd5afa0611ce80d1b7f02629c",
)
_FASHION_MD5 = (
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "25c81989df183df01b3e8a0aad5dffbe",
    "bef4ecab320f06d8554ea6380940ec79",
    "bb300cfdad3c16e7a12a480ee83cd310",
)

_CIFAR10 = DataSource(
    title="CIFAR-10",
    num_classes=10,
    image_shape=(3, 32, 32),
    mean=_CIFAR_MEAN,
    std=(0.2470, 0.2435, 0.2616),
    augment="crop_flip",
    many_threshold=1000,
    few_threshold=200,
    description="CIFAR-10 python pickles in DATA_ROOT/cifar-10-batches-py (downloaded by torchvision)",
    read=partial(
        read_cifar,
        key="cifar10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
)
_CIFAR100 = DataSource(
    title="CIFAR-100",
    num_classes=100,
    image_shape=(3, 32, 32),
    mean=_CIFAR_MEAN,
    std=(0.2023, 0.1994, 0.2010),
    augment="crop_flip",
    many_threshold=100,
    few_threshold=20,
    description="CIFAR-100 python pickles in DATA_ROOT/cifar-100-python (downloaded by torchvision)",
    read=partial(
        read_cifar,
        key="cifar100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
)
_MNIST = DataSource(
    title="MNIST",
    num_classes=10,
    image_shape=(1, 28, 28),
    mean=(0.1307,),
    std=(0.3081,),
    augment="none",
    many_threshold=1000,
    few_threshold=200,
    pooled_stats=((0.1301,), (0.3069,)),  # the authors' utils/data_units.py, with their pooled split
    description=(
        "MNIST IDX files in DATA_ROOT/MNIST/raw, DATA_ROOT/mnist or DATA_ROOT (downloaded by torchvision)"
    ),
    read=partial(
        read_mnist_like,
        key="mnist",
        dirs=("MNIST/raw", "mnist", ""),
        download_dir="MNIST/raw",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5s=_MNIST_MD5,
        num_classes=10,
    ),
)
_FASHION_MNIST = DataSource(
    title="Fashion-MNIST",
    num_classes=10,
    image_shape=(1, 28, 28),
    mean=(0.2860,),
    std=(0.3530,),
    augment="none",
    many_threshold=1000,
    few_threshold=200,
    description=(
        "Fashion-MNIST IDX files in DATA_ROOT/FashionMNIST/raw, DATA_ROOT/fashion-mnist or DATA_ROOT "
        "(downloaded by torchvision; Debian: apt-get install dataset-fashion-mnist, "
        "data root /usr/share/datasets)"
    ),
    read=partial(
        read_mnist_like,
        key="fashion-mnist",
        dirs=("FashionMNIST/raw", "fashion-mnist", ""),
        download_dir="FashionMNIST/raw",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5s=_FASHION_MD5,
        num_classes=10,
        extra_hint=(
            " (on Debian: apt-get install dataset-fashion-mnist and use --data-root /usr/share/datasets)"
        ),
    ),
)
_DIGITS = DataSource(
    title="scikit-learn digits",
    num_classes=10,
    image_shape=(1, 8, 8),
    mean=DIGITS_MEAN,
    std=DIGITS_STD,
    augment="none",
    many_threshold=50,
    few_threshold=20,
    description="sklearn.datasets.load_digits, bundled with scikit-learn (no files, no network)",
    read=read_digits,
    needs_files=False,
    n_max_rule="min",
)

def _read_unused(root: Path, download: bool) -> Raw:  # pragma: no cover - split_rule "lists" never calls it
    raise NotImplementedError


_MINI_IMAGENET = DataSource(
    title="mini-ImageNet",
    num_classes=100,
    image_shape=(3, 224, 224),
    mean=_mini.MEAN,
    std=_mini.STD,
    augment="resized_crop_flip",  # the authors' RandomResizedCrop(224) + flip (trainables/augment.py)
    many_threshold=100,
    few_threshold=20,
    description=(
        "the 100 mini-ImageNet classes of ImageNet's training images, 500/100/100 per class "
        "train/val/test (TailCalibX, seeded), decoded into DATA_ROOT/mini-imagenet by "
        "`wbsweep data prepare mini-imagenet --imagenet-root DIR`; validation is the prepared 100 per "
        "class (val_per_class does not apply)"
    ),
    read=_read_unused,
    split_rule="lists",
)

#: name -> spec. The "-lt" entries are the long-tailed datasets; the plain names are the same
#: split at rho = 1 (balanced), with the same validation carve-out and group thresholds.
DATASETS: dict[str, DatasetSpec] = {
    "cifar10-lt": DatasetSpec(_CIFAR10, default_rho=100.0),
    "cifar10": DatasetSpec(_CIFAR10, default_rho=1.0),
    "cifar100-lt": DatasetSpec(_CIFAR100, default_rho=100.0),
    "cifar100": DatasetSpec(_CIFAR100, default_rho=1.0),
    "mnist-lt": DatasetSpec(_MNIST, default_rho=100.0),
    "mnist": DatasetSpec(_MNIST, default_rho=1.0),
    "fashion-mnist-lt": DatasetSpec(_FASHION_MNIST, default_rho=100.0),
    "fashion-mnist": DatasetSpec(_FASHION_MNIST, default_rho=1.0),
    "mini-imagenet-lt": DatasetSpec(_MINI_IMAGENET, default_rho=100.0),
    "mini-imagenet": DatasetSpec(_MINI_IMAGENET, default_rho=1.0),
    "digits-lt": DatasetSpec(_DIGITS, default_rho=10.0),
    "digits": DatasetSpec(_DIGITS, default_rho=1.0),
}


def dataset_names() -> list[str]:
    """Registered dataset names, sorted (for ``wbsweep list`` and error messages)."""
    return sorted(DATASETS)


def _spec(name: str) -> DatasetSpec:
    if not isinstance(name, str):
        raise WbsweepError(
            f"dataset name must be a string, got {name!r}; valid names: {', '.join(dataset_names())}"
        )
    spec = DATASETS.get(name)
    if spec is None:
        spec = DATASETS.get(name.strip().lower().replace("_", "-"))  # "CIFAR100_LT" is meant kindly
    if spec is None:
        close = difflib.get_close_matches(name.lower(), dataset_names(), n=1, cutoff=0.4)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise WbsweepError(f"unknown dataset {name!r}; {guess}valid names: {', '.join(dataset_names())}")
    return spec


def dataset_info(name: str) -> dict[str, Any]:
    """What ``wbsweep list`` shows about a dataset, without reading any file."""
    spec = _spec(name)
    src = spec.source
    return {
        "name": _canonical(name),
        "title": src.title,
        "num_classes": src.num_classes,
        "image_shape": src.image_shape,
        "default_rho": spec.default_rho,
        "many_threshold": src.many_threshold,
        "few_threshold": src.few_threshold,
        "augment": src.augment,
        "mean": src.mean,
        "std": src.std,
        "needs_files": src.needs_files,
        "source": src.description,
    }


def _canonical(name: str) -> str:
    return name if name in DATASETS else name.strip().lower().replace("_", "-")


# --------------------------------------------------------------------------------------------------
# Loading = reading + the LT split
# --------------------------------------------------------------------------------------------------


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A contiguous CPU tensor that owns writable memory (torch warns on read-only numpy buffers)."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


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
        return _load_from_lists(name, src, resolve_root(data_root), rho)
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


def data_fingerprint(data: LTDataset) -> str:
    """A short SHA-256 of a split's content: every image and label of train, validation and test, in
    order, with their shapes. Two datasets of one name (a fake CIFAR and the real one, another
    --data-root) have different fingerprints, and the sweep hashes it into the config, so a model is
    never reused for other data. Computed once and kept in ``data.fingerprint`` (datasets prepared
    as lists, mini-ImageNet, get it from their list files instead: :func:`_load_from_lists`)."""
    if not data.fingerprint:
        h = hashlib.sha256()
        for split in ("train", "val", "test"):
            for t in (getattr(data, f"x_{split}"), getattr(data, f"y_{split}")):
                a = np.ascontiguousarray(t.numpy())
                h.update(f"{split}{a.dtype}{a.shape}".encode())
                h.update(memoryview(a).cast("B"))
        data.fingerprint = h.hexdigest()[:16]
    return data.fingerprint


def _lists_counts(key: str, y_train: np.ndarray, num_classes: int, rho: float) -> list[int]:
    """n_k of a prepared-lists dataset, or a one-line error when a class would get none."""
    n_max = int(np.bincount(y_train, minlength=num_classes).min())
    counts = _mini.lt_counts_int(n_max, num_classes, rho)
    if min(counts) < 1:
        raise WbsweepError(f"{key}: rho={rho:g} with {n_max} train images per class leaves class "
                           f"{counts.index(min(counts))} no training images; use a smaller rho")
    return counts


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
    key = _canonical(name)
    folder = resolve_root(data_root) / _mini.FOLDER
    splits = _mini.read_prepared(folder, key)
    counts = _lists_counts(key, splits["train"][1], spec.source.num_classes, rho)
    return _lists_fingerprint(folder, counts)


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


def _load_from_lists(name: str, src: DataSource, root: Path, rho: float) -> LTDataset:
    """mini-ImageNet(-LT) from a prepared folder (trainables/mini_imagenet.py): the first
    n_k = int(500 * (1/rho) ** (k / 99)) train images of class k in list order, the prepared
    validation and test sets unchanged."""
    key = _canonical(name)
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
