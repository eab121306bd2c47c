"""The dataset registry: where each original dataset comes from and the constants that belong to it.

A :class:`DataSource` says how to read one original dataset (a reader of trainables/readers.py, or
prepared lists for mini-ImageNet) with its classes, image shape, normalisation, augmentation and
Many/Few thresholds; :data:`DATASETS` maps each name to a source and its default imbalance ratio.
Adding a dataset is one entry in ``DATASETS`` (plus a ``DataSource`` if it reads a new format).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from trainables import mini_imagenet as _mini
from trainables.errors import WbsweepError
from trainables.readers import (
    DIGITS_MEAN,
    DIGITS_STD,
    Raw,
    read_cifar,
    read_digits,
    read_mnist_like,
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

