"""Tests of post-hoc logit adjustment on hand-made logits and against an explicitly adjusted nn.Linear."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables.errors import WbsweepError
from trainables.posthoc import (
    GAMMA_GRID,
    TAU_GRID,
    adjust_logits,
    default_grid,
    evaluate_la,
    tune_la,
)


def test_grids() -> None:
    assert len(TAU_GRID) == 21 and len(GAMMA_GRID) == 21
    assert TAU_GRID[0] == 1.0 and TAU_GRID[-1] == 2.0 and TAU_GRID[1] == 1.05 and 1.5 in TAU_GRID
    assert GAMMA_GRID[0] == 0.0 and GAMMA_GRID[-1] == 1.0 and GAMMA_GRID[13] == 0.65
    assert default_grid("add") == list(TAU_GRID)
    assert default_grid("mult") == list(GAMMA_GRID)
    assert default_grid("none") == []
    with pytest.raises(WbsweepError):
        default_grid("scale")


def test_additive_hand() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    prior = [0.5, 0.3, 0.2]
    # -log(0.5) = 0.693147, -log(0.3) = 1.203973, -log(0.2) = 1.609438
    expected = np.array([[1.693147, 3.203973, 4.609438], [0.693147, 1.203973, 1.609438]])
    np.testing.assert_allclose(adjust_logits(logits, "add", 1.0, prior), expected, atol=1e-6)
    np.testing.assert_allclose(adjust_logits(logits, "add", 2.0, prior), logits + 2 * (expected - logits),
                               atol=1e-6)
    # counts give the same result as probabilities (prior is normalised)
    np.testing.assert_allclose(adjust_logits(logits, "add", 1.0, [50, 30, 20]), expected, atol=1e-6)
    np.testing.assert_array_equal(adjust_logits(logits, "none", None, prior), logits)


def test_multiplicative_hand() -> None:
    prior = [0.5, 0.25, 0.25]  # prior^-1 = [2, 4, 4]
    logits = np.array([[3.0, 2.0, 4.0]])
    # code form: z * prior^-gamma
    code = adjust_logits(logits, "mult", 1.0, prior, mult_form="code")
    np.testing.assert_allclose(code, [[6.0, 8.0, 16.0]])
    # paper form, bias [1, 0, 0], norms [2, 1, 4]:
    # ((3-1)/2*2 + 1, 2/1*4 + 0, 4/4*4 + 0) = (3, 8, 4)
    out = adjust_logits(logits, "mult", 1.0, prior, bias=[1.0, 0.0, 0.0], weight_norms=[2.0, 1.0, 4.0])
    np.testing.assert_allclose(out, [[3.0, 8.0, 4.0]])
    # gamma = 0 on a unit-norm classifier changes nothing
    np.testing.assert_allclose(adjust_logits(logits, "mult", 0.0, prior), logits)
    with pytest.raises(WbsweepError):
        adjust_logits(logits, "mult", 1.0, prior, mult_form="weird")
    with pytest.raises(WbsweepError):
        adjust_logits(logits, "mul", 1.0, prior)
    with pytest.raises(WbsweepError):
        adjust_logits(logits, "add", 1.0, [0.5, 0.5, 0.0])


def test_multiplicative_paper_matches_adjusted_linear() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.mul_(torch.tensor([[0.5], [1.0], [3.0], [7.0]]))
        lin.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
    h = torch.randn(10, 6, dtype=torch.float64)
    prior = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    gamma = 0.65
    w = lin.weight.detach().double()
    b = lin.bias.detach().double()
    # adjusted classifier built explicitly: unit rows scaled by prior^-gamma, bias kept
    w_adj = w / w.norm(dim=1, keepdim=True) * prior[:, None] ** (-gamma)
    expected = (h @ w_adj.T + b).numpy()
    logits = (h @ w.T + b).numpy()
    norms = lin.weight.norm(dim=1)
    out = adjust_logits(logits, "mult", gamma, prior.numpy(), bias=lin.bias, weight_norms=norms)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # the code form is different here (norms and bias ignored)
    code = adjust_logits(logits, "mult", gamma, prior.numpy(), mult_form="code")
    assert not np.allclose(code, expected, atol=1e-3)


def _tail_val_set() -> tuple[np.ndarray, np.ndarray]:
    # prior [0.8, 0.2]: additive LA raises z_1 - z_0 by tau * log(0.8 / 0.2) = tau * log 4.
    # class-0 sample A: z_0 - z_1 = 3 log 4 (stays right over the whole grid)
    # class-0 sample B: z_0 - z_1 = 1.72 log 4 (wrong once tau > 1.72, i.e. from 1.75 on)
    # class-1 sample C: z_0 - z_1 = 1.48 log 4 (right only once tau > 1.48, i.e. from 1.50 on)
    # so balanced accuracy is 100 exactly for tau in {1.50, ..., 1.70}; the first is 1.50.
    log4 = math.log(4.0)
    margins = np.array([3.0, 1.72, 1.48]) * log4
    logits = np.stack([margins, np.zeros(3)], axis=1)
    return logits, np.array([0, 0, 1])


def test_tune_la_additive_known_best() -> None:
    logits, labels = _tail_val_set()
    tau, acc = tune_la(logits, labels, "add", [0.8, 0.2])
    assert tau == 1.5
    assert acc == pytest.approx(100.0)
    # without LA the tail sample is wrong: class 0 100 %, class 1 0 % -> 50
    none_param, none_acc = tune_la(logits, labels, "none", [0.8, 0.2])
    assert none_param is None and none_acc == pytest.approx(50.0)
    res = evaluate_la(logits, labels, "add", 1.75, [0.8, 0.2], groups=["many", "few"])
    assert res["many"] == pytest.approx(50.0) and res["few"] == pytest.approx(100.0)
    assert res["avg"] == pytest.approx(75.0)


def test_tune_la_ties_go_to_first_grid_value() -> None:
    logits = np.array([[5.0, 0.0], [0.0, 5.0]])
    labels = np.array([0, 1])
    assert tune_la(logits, labels, "add", [0.6, 0.4], grid=[1.2, 1.0, 1.1]) == (1.2, 100.0)
    gamma, acc = tune_la(logits, labels, "mult", [0.6, 0.4])
    assert gamma == 0.0 and acc == pytest.approx(100.0)


def test_tune_la_multiplicative_code_form() -> None:
    # prior [0.8, 0.2]: the code form multiplies z_0 by 0.8^-gamma and z_1 by 0.2^-gamma, so the
    # ratio z'_1 / z'_0 grows by 4^gamma.
    # tail sample logits (2.1, 1.0): right once 4^gamma > 2.1, gamma > 0.535 -> first grid value 0.55
    # head sample logits (3.0, 1.0): wrong once 4^gamma > 3, gamma > 0.792 -> right up to 0.75
    logits = np.array([[3.0, 1.0], [2.1, 1.0]])
    labels = np.array([0, 1])
    gamma, acc = tune_la(logits, labels, "mult", [0.8, 0.2], mult_form="code")
    assert gamma == 0.55 and acc == pytest.approx(100.0)
