"""Classifier heads and their constraints: the fixed simplex-ETF classifier and MaxNorm (WB stage 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainables.errors import WbsweepError


def etf_matrix(feature_dim: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Simplex equiangular tight frame, paper eq. 11 with E_W = 1, as a (C, d) float32 tensor.

    W = sqrt(C / (C - 1)) U (I_C - 11^T / C) with U a d x C matrix with orthonormal columns; the
    returned tensor is W^T so that rows are class vectors, like ``nn.Linear.weight``. The rows then
    have unit norm and pairwise cosine -1/(C - 1). U is the Q factor of a seeded Gaussian matrix drawn
    from a local ``torch.Generator`` (never the global RNG, so building the head does not shift the
    model's initialisation), with column signs fixed by diag(R) > 0 so Q is uniquely determined.
    U needs d >= C.
    """
    if num_classes < 2:
        raise WbsweepError(f"an ETF classifier needs at least 2 classes, got {num_classes}")
    if feature_dim < num_classes:
        raise WbsweepError(
            f"an ETF classifier needs feature_dim >= num_classes, got d={feature_dim} < C={num_classes}"
        )
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    gauss = torch.randn(feature_dim, num_classes, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    u = q * signs[None, :]
    centring = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    w = math.sqrt(num_classes / (num_classes - 1)) * (u @ centring)  # (d, C)
    return w.T.contiguous().to(torch.float32)


class ETFClassifier(nn.Module):
    """Linear classifier whose weight is a fixed simplex ETF (never trained), plus an optional bias.

    The weight is a registered buffer: it is saved in ``state_dict`` and follows ``.to(device)`` but
    is not in ``parameters()``, so no optimiser or weight decay touches it. The bias (zeros at
    init) is an ``nn.Parameter`` so that, as in the authors' code, it is learned and weight-decayed
    like any other parameter. ``.weight`` (C, d) and ``.bias`` mirror ``nn.Linear`` so code can
    treat both heads alike (e.g. post-hoc LA reads row norms and the bias from either).
    """

    weight: torch.Tensor
    bias: nn.Parameter | None

    def __init__(self, feature_dim: int, num_classes: int, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.in_features = feature_dim
        self.out_features = num_classes
        self.seed = seed
        self.register_buffer("weight", etf_matrix(feature_dim, num_classes, seed))
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_classes))
        else:
            self.register_parameter("bias", None)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, seed={self.seed}"
        )


def maxnorm_threshold(weight: torch.Tensor, alpha: float = 0.1) -> float:
    """MaxNorm radius from the stage-1 classifier rows: min_k||w_k|| + alpha (max_k||w_k|| - min_k||w_k||).

    This is how the weight-balancing code sets eta (a single radius for all classes, paper eq. 6-7)
    from the weights at the start of stage 2 (``alpha`` = its "thresh", 0.1).
    """
    if not math.isfinite(alpha) or alpha < 0:
        raise WbsweepError(f"MaxNorm alpha must be a non-negative number, got {alpha}")
    if weight.dim() != 2:
        raise ValueError(f"expected a (C, d) weight matrix, got shape {tuple(weight.shape)}")
    norms = weight.detach().to(torch.float64).norm(dim=1)
    lo, hi = float(norms.min()), float(norms.max())
    return lo + alpha * (hi - lo)


def apply_maxnorm_(weight: torch.Tensor, threshold: float) -> None:
    """Project classifier rows onto the MaxNorm ball in place (paper eq. 7).

    w_k <- min(1, eta / ||w_k||) w_k: rows longer than ``threshold`` are rescaled onto it (direction
    kept), shorter rows are untouched. Runs under ``no_grad`` so it is a projection step of projected
    gradient descent, not part of the graph. Pass only the weight: the bias is not constrained.
    """
    if not math.isfinite(threshold) or threshold < 0:
        raise WbsweepError(f"MaxNorm threshold must be a non-negative number, got {threshold}")
    if weight.dim() != 2:
        raise ValueError(f"expected a (C, d) weight matrix, got shape {tuple(weight.shape)}")
    with torch.no_grad():
        norms = weight.norm(dim=1, keepdim=True)
        # threshold / 0 = inf -> clamped to 1, so zero rows stay zero instead of becoming nan.
        factor = (threshold / norms).clamp(max=1.0)
        weight.mul_(factor.to(weight.dtype))
