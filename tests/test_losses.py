"""Tests of class-balanced weights and losses, feature regularisation and the DR loss, by hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.errors import WbsweepError
from trainables.losses import (
    cb_weights,
    class_balanced_loss,
    dot_regression_loss,
    feature_regularisation,
)


def test_cb_weights_hand_beta_09() -> None:
    # counts [100, 10], beta 0.9:
    # 0.9^100 = 2.6561e-5 -> raw_0 = 0.1 / 0.99997344 = 0.10000266
    # 0.9^10 = 0.34867844 -> raw_1 = 0.1 / 0.65132156 = 0.15353399
    # normalised to sum 2: 2 * raw / 0.25353665 = [0.788862, 1.211138]
    w = cb_weights([100, 10], beta=0.9)
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([0.788862, 1.211138], abs=1e-5)


def test_cb_weights_hand_beta_09999() -> None:
    # beta 0.9999: 1 - 0.9999^100 = 0.00995066 -> raw_0 = 1e-4 / 0.00995066 = 0.01004958
    #              1 - 0.9999^10 = 0.00099955  -> raw_1 = 1e-4 / 0.00099955 = 0.10004501
    # normalised to sum 2: [0.182563, 1.817437]
    w = cb_weights([100, 10])
    assert w.tolist() == pytest.approx([0.182563, 1.817437], abs=1e-5)
    assert float(w.sum()) == pytest.approx(2.0, abs=1e-6)


def test_cb_weights_limit_and_ordering() -> None:
    counts = torch.tensor([480, 200, 37, 5])
    # beta -> 1: w_k -> N_bar / n_k with N_bar the harmonic mean C / sum(1/n)
    harmonic = 4 / (1 / 480 + 1 / 200 + 1 / 37 + 1 / 5)
    limit = [harmonic / n for n in (480, 200, 37, 5)]
    assert cb_weights(counts, beta=1.0).tolist() == pytest.approx(limit, rel=1e-6)
    assert cb_weights(counts, beta=1 - 1e-9).tolist() == pytest.approx(limit, rel=1e-4)
    w = cb_weights(counts, beta=0.999)
    assert float(w.sum()) == pytest.approx(4.0, abs=1e-5)
    assert all(a < b for a, b in zip(w.tolist(), w.tolist()[1:], strict=False))  # rarer is heavier
    # beta = 0 gives uniform weights
    assert cb_weights(counts, beta=0.0).tolist() == pytest.approx([1.0] * 4)
    with pytest.raises(WbsweepError):
        cb_weights([10, 0])
    with pytest.raises(WbsweepError):
        cb_weights([10, 5], beta=1.5)


def test_class_balanced_softmax_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([0, 1])
    weights = torch.tensor([0.5, 2.5])
    # CE_0 = log(1 + e^-2) = 0.126928, CE_1 = log 2 = 0.693147
    # mean_i w_{y_i} CE_i = (0.5 * 0.126928 + 2.5 * 0.693147) / 2 = 0.898166
    loss = class_balanced_loss(logits, targets, weights)
    assert float(loss) == pytest.approx(0.898166, abs=1e-6)
    # torch's weighted mean divides by sum of weights (3), not N (2): 0.598777
    torch_loss = F.cross_entropy(logits, targets, weight=weights)
    assert float(torch_loss) == pytest.approx(0.598777, abs=1e-6)
    assert not math.isclose(float(loss), float(torch_loss), abs_tol=1e-3)
    with pytest.raises(WbsweepError):
        class_balanced_loss(logits, targets, weights, form="focal")


def test_class_balanced_bce_hand() -> None:
    # sample 1: logits (log 2, 0, 0) -> p = (0.5, 0.25, 0.25), target 1:
    #   -log(1 - 0.5) - log(0.25) - log(1 - 0.25) = 0.693147 + 1.386294 + 0.287682 = 2.367124
    # sample 2: logits (0, 0, 0) -> p = 1/3 each, target 0:
    #   -log(1/3) - 2 log(2/3) = 1.098612 + 0.810930 = 1.909543
    # weights (1, 2, 0.5): (2 * 2.367124 + 1 * 1.909543) / (2 * 3) = 1.107298
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([1, 0])
    weights = torch.tensor([1.0, 2.0, 0.5])
    loss = class_balanced_loss(logits, targets, weights, form="bce")
    assert float(loss) == pytest.approx(1.107298, abs=1e-5)


def test_feature_regularisation_hand() -> None:
    # ||(3, 4)||^2 = 25, ||0||^2 = 0 -> mean 12.5; zeta / 2 = 0.05 -> 0.625
    feats = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert float(feature_regularisation(feats, 0.1)) == pytest.approx(0.625)


def test_dot_regression_hand_and_gradient() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    h = torch.tensor([[1.0, 1.0], [0.0, 3.0]], requires_grad=True)
    targets = torch.tensor([0, 1])
    # sample 1: w_0 . h = 1, ||w_0|| ||h|| = sqrt 2:
    #   (1 - sqrt 2)^2 / (2 sqrt 2) = 0.171573 / 2.828427 = 0.060660
    # sample 2: h parallel to w_1 -> 0; mean = 0.030330
    loss = dot_regression_loss(h, w, targets)
    assert float(loss.detach()) == pytest.approx(0.0303301, abs=1e-6)
    loss.backward()
    # analytic gradient with c = ||w|| ||h|| constant: d/dh (w.h - c)^2 / (2c) = (w.h - c) w / c, / N
    s2 = math.sqrt(2.0)
    expected = torch.tensor([[(1 - s2) / s2 / 2, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(h.grad, expected)
    # had the norms not been detached the gradient would differ (d||h||/dh = h/||h|| != 0)
    h2 = h.detach().clone().requires_grad_(True)
    wy = w[targets]
    c = wy.norm(dim=1) * h2.norm(dim=1)
    (((wy * h2).sum(1) - c) ** 2 / (2 * c)).mean().backward()
    assert not torch.allclose(h2.grad, expected)


def test_dot_regression_zero_when_parallel_and_finite_at_zero() -> None:
    w = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    h = torch.tensor([[3.0, 4.0], [2.5, 0.0], [0.0, 0.0]])
    targets = torch.tensor([0, 1, 0])
    loss = dot_regression_loss(h, w, targets)
    assert float(loss) == pytest.approx(0.0, abs=1e-7)
