"""Tests of trainables.metrics: FDR against hand-worked and independent computations, recall, groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables.errors import WbsweepError
from trainables.metrics import (
    balanced_accuracy,
    fdr,
    group_accuracy,
    groups_from_counts,
    per_class_recall,
)


def _reference_fdr(x: np.ndarray, y: np.ndarray) -> float:
    """Independent FDR: per-class covariance matrices (np.cov * (n - 1)), explicit loops, np.linalg.inv."""
    mu = x.mean(axis=0)
    d = x.shape[1]
    s_w = np.zeros((d, d))
    s_b = np.zeros((d, d))
    for k in np.unique(y):
        xk = x[y == k]
        s_w += np.cov(xk, rowvar=False) * (len(xk) - 1)
        diff = xk.mean(axis=0) - mu
        s_b += len(xk) * np.outer(diff, diff)
    return float(np.trace(np.linalg.inv(s_w) @ s_b))


def _clusters(rng: np.random.Generator, sep: float, d: int = 5, classes: int = 4, n: int = 60):
    centres = rng.normal(size=(classes, d)) * sep
    counts = [n, n // 2, n // 3, n // 6][:classes]
    xs, ys = [], []
    for k, c in enumerate(counts):
        xs.append(centres[k] + rng.normal(size=(c, d)))
        ys.append(np.full(c, k))
    return np.concatenate(xs), np.concatenate(ys)


def test_fdr_hand_1d() -> None:
    # class 0 at {0, 2} (mean 1), class 1 at {4, 6} (mean 5), overall mean 3.
    # S_W = (0-1)^2 + (2-1)^2 + (4-5)^2 + (6-5)^2 = 4; S_B = 2*(1-3)^2 + 2*(5-3)^2 = 16; FDR = 16/4 = 4.
    x = np.array([0.0, 2.0, 4.0, 6.0])
    y = np.array([0, 0, 1, 1])
    assert fdr(x[:, None], y) == pytest.approx(4.0)
    assert fdr(x, y) == pytest.approx(4.0)  # 1-D features accepted as (N, 1)


def test_fdr_hand_2d() -> None:
    # class 0: (0,0),(2,0),(1,1),(1,-1), mean (1,0); class 1: the same shape around (6,2).
    # Deviations (+-1,0),(0,+-1) per class -> S_W = 2 * diag(2, 2) = diag(4, 4).
    # mu = (3.5, 1); mu_k - mu = -+(2.5, 1); S_B = 2 * 4 * [[6.25, 2.5], [2.5, 1]] = [[50, 20], [20, 8]].
    # tr(S_W^-1 S_B) = (50 + 8) / 4 = 14.5.
    x = np.array([[0, 0], [2, 0], [1, 1], [1, -1], [5, 2], [7, 2], [6, 3], [6, 1]], dtype=float)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert fdr(x, y) == pytest.approx(14.5)


def test_fdr_singular_within_scatter_uses_pinv() -> None:
    # class 0: (0,0),(2,0); class 1: (4,1),(6,1). Dimension 2 is constant inside each class, so
    # S_W = [[4, 0], [0, 0]] is singular. mu = (3, 0.5): S_B = 4 * [[4, 1], [1, 0.25]] = [[16, 4], [4, 1]].
    # pinv(S_W) = diag(1/4, 0) -> tr(pinv(S_W) S_B) = 16 / 4 = 4.
    x = np.array([[0, 0], [2, 0], [4, 1], [6, 1]], dtype=float)
    y = np.array([0, 0, 1, 1])
    assert fdr(x, y) == pytest.approx(4.0)


def test_fdr_matches_independent_computation() -> None:
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, sep=2.0)
    assert fdr(x, y) == pytest.approx(_reference_fdr(x, y), rel=1e-9)
    # torch input and float32 features give the same value (computed in float64 internally)
    assert fdr(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(_reference_fdr(x, y), rel=1e-9)


def test_fdr_drops_constant_dimensions() -> None:
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, sep=2.0)
    base = fdr(x, y)
    padded = np.concatenate([np.zeros((len(x), 1)), x, np.full((len(x), 2), 3.5)], axis=1)
    assert fdr(padded, y) == pytest.approx(base, rel=1e-10)
    # without dropping, S_W is singular: the pseudo-inverse ignores the dead dimensions too
    assert fdr(padded, y, drop_constant=False) == pytest.approx(base, rel=1e-6)


def test_fdr_grows_with_separation() -> None:
    values = []
    for sep in (0.5, 1.0, 2.0, 4.0):
        rng = np.random.default_rng(2)  # same noise, only the centre spread changes
        x, y = _clusters(rng, sep=sep)
        values.append(fdr(x, y))
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_fdr_affine_invariant() -> None:
    rng = np.random.default_rng(3)
    x, y = _clusters(rng, sep=1.5)
    a = rng.normal(size=(x.shape[1], x.shape[1])) + 3 * np.eye(x.shape[1])
    assert abs(np.linalg.det(a)) > 1e-3
    shift = rng.normal(size=x.shape[1]) * 10
    assert fdr(x @ a + shift, y) == pytest.approx(fdr(x, y), rel=1e-8)


def test_fdr_absent_classes_and_degenerate_cases() -> None:
    x = np.array([0.0, 2.0, 4.0, 6.0])[:, None]
    # labels 3 and 7 with num_classes 10: absent classes skipped, same value as labels 0/1
    assert fdr(x, np.array([3, 3, 7, 7]), num_classes=10) == pytest.approx(4.0)
    assert math.isnan(fdr(x, np.zeros(4, dtype=int)))
    assert math.isnan(fdr(np.array([[np.nan], [1.0], [2.0], [3.0]]), np.array([0, 0, 1, 1])))
    with pytest.raises(ValueError):
        fdr(x, np.array([0, 0, 1, 12]), num_classes=10)


def test_per_class_recall_and_groups() -> None:
    # 4 classes; class 3 has no samples.
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 2, 3, 3])
    recall = per_class_recall(preds, labels, 4)
    # class 0: 3/4, class 1: 1/2, class 2: 1/3, class 3: nan
    np.testing.assert_allclose(recall[:3], [0.75, 0.5, 1 / 3])
    assert math.isnan(recall[3])
    # logits give the same recall via argmax
    logits = np.eye(4)[preds]
    np.testing.assert_allclose(per_class_recall(logits, labels, 4), recall)

    acc = group_accuracy(recall, ["many", "many", "few", "few"])
    assert acc["many"] == pytest.approx(62.5)  # mean(75, 50)
    assert acc["few"] == pytest.approx(100 / 3)  # class 3 has no samples, ignored
    assert math.isnan(acc["medium"])  # empty group
    assert acc["avg"] == pytest.approx((75 + 50 + 100 / 3) / 3)
    assert balanced_accuracy(logits, labels, 4) == pytest.approx(acc["avg"])
    from_torch = balanced_accuracy(torch.from_numpy(preds), torch.from_numpy(labels), 4)
    assert from_torch == pytest.approx(acc["avg"])

    with pytest.raises(WbsweepError):
        group_accuracy(recall, ["many", "many", "tail", "few"])


def test_groups_from_counts() -> None:
    # CIFAR100 thresholds: many > 100, few < 20
    assert groups_from_counts([480, 101, 100, 20, 19, 5], 100, 20) == [
        "many", "many", "medium", "medium", "few", "few",
    ]
