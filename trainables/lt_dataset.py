"""The long-tailed dataset in memory and the arithmetic every split rule shares.

:class:`LTDataset` holds a split as whole uint8 tensors; :func:`lt_counts` is the exponential
long-tailed profile n_k, :func:`class_groups` the Many/Medium/Few labels per class, and
:func:`data_fingerprint` a short hash of a split's content. The split rules themselves are in
trainables/data.py (the training file's pool, the authors' pooled MNIST split) and
trainables/list_split.py (prepared file lists, mini-ImageNet).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainables.errors import WbsweepError


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


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A contiguous CPU tensor that owns writable memory (torch warns on read-only numpy buffers)."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)



def data_fingerprint(data: LTDataset) -> str:
    """A short SHA-256 of a split's content: every image and label of train, validation and test, in
    order, with their shapes. Two datasets of one name (a fake CIFAR and the real one, another
    --data-root) have different fingerprints, and the sweep hashes it into the config, so a model is
    never reused for other data. Computed once and kept in ``data.fingerprint`` (datasets prepared
    as lists, mini-ImageNet, get it from their list files instead: :func:`trainables.list_split.load_from_lists`)."""
    if not data.fingerprint:
        h = hashlib.sha256()
        for split in ("train", "val", "test"):
            for t in (getattr(data, f"x_{split}"), getattr(data, f"y_{split}")):
                a = np.ascontiguousarray(t.numpy())
                h.update(f"{split}{a.dtype}{a.shape}".encode())
                h.update(memoryview(a).cast("B"))
        data.fingerprint = h.hexdigest()[:16]
    return data.fingerprint
