"""Evaluation metrics: Fisher's discriminant ratio, per-class recall, Many/Medium/Few accuracy.

Everything here works on numpy arrays (torch tensors are accepted and converted) so that metrics can
be computed from stored features / logits without a model or a GPU.

Long-tailed accuracy in the paper (and in both official codebases) is the *balanced* accuracy: the
mean over classes of per-class recall, which on the class-balanced test sets equals plain accuracy
but on a balanced validation split with missing classes must ignore the classes without samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trainables.errors import WbsweepError

GROUP_NAMES: tuple[str, ...] = ("many", "medium", "few")


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a torch tensor (duck-typed, so this module never imports torch) or array-like to numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels_array(labels: Any, n: int, num_classes: int | None) -> np.ndarray:
    """Validate integer labels of length ``n`` (and range, when ``num_classes`` is known)."""
    y = _to_numpy(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integer class indices")
        y = y.astype(np.int64)
    y = y.astype(np.int64, copy=False)
    if y.size and y.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise ValueError(f"label {int(y.max())} is out of range for num_classes={num_classes}")
    return y


def fdr(
    features: Any,
    labels: Any,
    num_classes: int | None = None,
    drop_constant: bool = True,
) -> float:
    """Fisher's discriminant ratio tr(S_W^{-1} S_B) of ``features`` (N, d) under ``labels`` (N,).

    This is the separability measure the paper uses (Table 3, Fig. 2), computed as the authors' code
    does: in float64, with

    * S_B = sum_k n_k (mu_k - mu)(mu_k - mu)^T, where mu is the mean of *all* samples (so the
      between-class scatter is weighted by class size, which matters on long-tailed data);
    * S_W = sum_k sum_{i in k} (x_i - mu_k)(x_i - mu_k)^T (unnormalised within-class scatter).

    Because both scatters are unnormalised sums, the ratio is scale-free and invariant to any
    invertible affine map of the features.

    Constant feature dimensions (zero variance over all samples, e.g. ReLU units that never fire) are
    removed first when ``drop_constant`` is true: they add a zero row/column to S_W that would make it
    singular while carrying no information. Classes absent from ``labels`` are skipped (they have no
    mean); ``num_classes`` only validates the label range.

    If S_W is still singular (rank-deficient, e.g. fewer samples than dimensions, or a dimension that
    is constant inside every class) the Moore-Penrose pseudo-inverse is used instead
    (``np.linalg.pinv(..., hermitian=True)``, with the same relative tolerance d * eps that decides
    the rank). Directions with zero within-class scatter then contribute nothing, so the value is a
    lower bound of the "infinite" separability along them; this is a documented choice, not an error.

    The trace is computed as tr(A S_W^{-1} A^T) with A = diag(sqrt(n_k)) (M - mu) of shape (K, d), so
    only a (d, K) solve is needed and no d x d product S_W^{-1} S_B is formed.

    Returns nan when fewer than two classes are present, or when the features are not all finite
    (a diverged model should yield a missing metric, not crash the trial).
    """
    x = _to_numpy(features)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, d), got {x.shape}")
    x = x.astype(np.float64, copy=False)
    y = _labels_array(labels, x.shape[0], num_classes)

    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        return float("nan")
    if not np.all(np.isfinite(x)):
        return float("nan")

    if drop_constant:
        keep = np.any(x != x[0:1], axis=0)
        x = x[:, keep]
    d = x.shape[1]
    if d == 0:
        # No informative dimension left: no separability at all (trace of an empty matrix).
        return 0.0

    # Class index 0..K-1 per sample, then class means via a scatter-add (no per-class Python loop).
    inverse = np.searchsorted(classes, y)
    sums = np.zeros((classes.size, d), dtype=np.float64)
    np.add.at(sums, inverse, x)
    class_means = sums / counts[:, None]
    overall_mean = x.mean(axis=0)

    centred = x - class_means[inverse]
    s_w = centred.T @ centred
    a = np.sqrt(counts.astype(np.float64))[:, None] * (class_means - overall_mean)  # (K, d)

    eigvals = np.linalg.eigvalsh(s_w)
    top = float(eigvals.max())
    if top <= 0.0:
        # Every class collapsed to a single point: S_W = 0, pinv(0) = 0, so the ratio is 0.
        return 0.0
    rel_tol = d * np.finfo(np.float64).eps
    if float(eigvals.min()) > rel_tol * top:
        s_w_inv_at = np.linalg.solve(s_w, a.T)  # (d, K)
    else:
        s_w_inv_at = np.linalg.pinv(s_w, rel_tol, hermitian=True) @ a.T
    return float(np.sum(a * s_w_inv_at.T))


def per_class_recall(predictions: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Recall of each class, a fraction in [0, 1]; nan for a class without samples.

    ``predictions`` are class indices (N,); a 2-D array is taken as logits/scores (N, C) and reduced
    with argmax (first maximum on ties, as torch/numpy argmax).
    """
    if num_classes < 1:
        raise WbsweepError(f"num_classes must be at least 1, got {num_classes}")
    p = _to_numpy(predictions)
    if p.ndim == 2:
        p = np.argmax(p, axis=1)
    if p.ndim != 1:
        raise ValueError(f"predictions must have shape (N,) or (N, C), got {p.shape}")
    y = _labels_array(labels, p.shape[0], num_classes)
    p = p.astype(np.int64, copy=False)
    totals = np.bincount(y, minlength=num_classes).astype(np.float64)
    hits = np.bincount(y[p == y], minlength=num_classes).astype(np.float64)
    recall = np.full(num_classes, np.nan, dtype=np.float64)
    present = totals > 0
    recall[present] = hits[present] / totals[present]
    return recall


def _nan_mean(values: np.ndarray) -> float:
    """Mean of the non-nan entries; nan (without a RuntimeWarning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def group_accuracy(recall: Any, groups: Sequence[str]) -> dict[str, float]:
    """Many/Medium/Few/overall accuracy in percent from per-class recalls.

    ``groups[k]`` names class k's group ("many", "medium" or "few"; see :func:`groups_from_counts`).
    As in the paper, a group's accuracy is the mean of its classes' recalls, and "avg" is the mean
    over all classes. Classes without samples (nan recall) are ignored; a group with no (evaluable)
    class is nan.
    """
    r = _to_numpy(recall).astype(np.float64).reshape(-1)
    if len(groups) != r.size:
        raise ValueError(f"groups has {len(groups)} entries but recall has {r.size} classes")
    names = np.asarray([str(g) for g in groups], dtype=object)
    unknown = sorted(set(names.tolist()) - set(GROUP_NAMES))
    if unknown:
        raise WbsweepError(f"unknown class group(s) {unknown}; expected one of {list(GROUP_NAMES)}")
    out = {name: _nan_mean(r[names == name]) * 100.0 for name in GROUP_NAMES}
    out["avg"] = _nan_mean(r) * 100.0
    return out


def groups_from_counts(class_counts: Any, many_above: int, few_below: int) -> list[str]:
    """Assign each class to "many" (n > many_above), "few" (n < few_below) or "medium" (otherwise).

    The paper's splits: CIFAR100-LT / mini-ImageNet-LT use (100, 20), CIFAR10-LT / MNIST-LT use
    (1000, 200) (docs/DESIGN.md section 4). Thresholds are counted on the *training* split.
    """
    if few_below > many_above + 1:
        raise WbsweepError(f"few_below={few_below} must not exceed many_above + 1={many_above + 1}")
    counts = _to_numpy(class_counts).reshape(-1)
    return ["many" if n > many_above else "few" if n < few_below else "medium" for n in counts.tolist()]


def balanced_accuracy(logits_or_preds: Any, labels: Any, num_classes: int) -> float:
    """Mean per-class recall in percent (classes without samples ignored).

    Accepts logits (N, C), reduced by argmax, or predicted class indices (N,).
    """
    return _nan_mean(per_class_recall(logits_or_preds, labels, num_classes)) * 100.0
