"""Tests of the fixed simplex-ETF classifier and the MaxNorm projection."""

from __future__ import annotations

import pytest
import torch

from trainables.errors import WbsweepError
from trainables.heads import ETFClassifier, apply_maxnorm_, etf_matrix, maxnorm_threshold


@pytest.mark.parametrize(("d", "c"), [(2, 2), (10, 10), (16, 5), (512, 100), (512, 10)])
def test_etf_geometry(d: int, c: int) -> None:
    w = etf_matrix(d, c, seed=3).double()
    assert w.shape == (c, d)
    gram = w @ w.T
    expected = (c / (c - 1)) * (torch.eye(c, dtype=torch.float64) - 1.0 / c)
    torch.testing.assert_close(gram, expected, atol=1e-5, rtol=0)
    # unit-norm rows, pairwise cosine -1/(C-1)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(c, dtype=torch.float64), atol=1e-6, rtol=0)
    off = gram[~torch.eye(c, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / (c - 1)), atol=1e-6, rtol=0)
    # class vectors sum to zero (centred simplex)
    torch.testing.assert_close(w.sum(dim=0), torch.zeros(d, dtype=torch.float64), atol=1e-5, rtol=0)


def test_etf_seeding() -> None:
    state = torch.get_rng_state()
    a = etf_matrix(64, 10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a, etf_matrix(64, 10, seed=7))
    assert not torch.allclose(a, etf_matrix(64, 10, seed=8), atol=1e-3)


def test_etf_errors() -> None:
    with pytest.raises(WbsweepError):
        etf_matrix(64, 100)
    with pytest.raises(WbsweepError):
        ETFClassifier(5, 10)
    with pytest.raises(WbsweepError):
        etf_matrix(8, 1)


def test_etf_classifier_fixed_weight_learned_bias() -> None:
    head = ETFClassifier(32, 8, seed=1)
    assert head.weight.shape == (8, 32) and head.bias is not None and head.bias.shape == (8,)
    names = [n for n, _ in head.named_parameters()]
    assert names == ["bias"]
    assert "weight" in head.state_dict() and "bias" in head.state_dict()
    assert torch.equal(head.weight, etf_matrix(32, 8, seed=1))
    before_w = head.weight.clone()
    before_b = head.bias.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-3)
    x = torch.randn(16, 32)
    y = torch.randint(0, 8, (16,))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    assert torch.equal(head.weight, before_w)
    assert not torch.equal(head.bias.detach(), before_b)
    # forward is W h + b like nn.Linear
    torch.testing.assert_close(head(x), x @ head.weight.T + head.bias)
    no_bias = ETFClassifier(32, 8, bias=False)
    assert no_bias.bias is None and list(no_bias.parameters()) == []
    torch.testing.assert_close(no_bias(x), x @ no_bias.weight.T)
    # loads back from a state_dict
    clone = ETFClassifier(32, 8, seed=99)
    clone.load_state_dict(head.state_dict())
    assert torch.equal(clone.weight, head.weight)


def test_maxnorm_threshold_and_projection() -> None:
    # row norms 1, 2, 5: threshold = 1 + 0.1 * (5 - 1) = 1.4
    w = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]))
    eta = maxnorm_threshold(w)
    assert eta == pytest.approx(1.4)
    assert maxnorm_threshold(w, alpha=0.5) == pytest.approx(3.0)
    apply_maxnorm_(w, eta)
    # row 0 (norm 1 < 1.4) untouched; row 1 -> (0, 1.4); row 2 -> (3, 4) * 1.4 / 5 = (0.84, 1.12)
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.4], [0.84, 1.12]])
    torch.testing.assert_close(w.detach(), expected)
    assert not w.grad_fn  # in-place under no_grad, still a leaf
    # a zero row stays zero (no nan)
    z = torch.zeros(2, 3)
    apply_maxnorm_(z, 1.0)
    assert torch.equal(z, torch.zeros(2, 3))
    with pytest.raises(WbsweepError):
        apply_maxnorm_(w, -1.0)
