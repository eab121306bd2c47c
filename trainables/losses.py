"""Losses and regularisers of the paper: class-balanced loss, feature regularisation, DR loss."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainables.errors import WbsweepError

CB_FORMS: tuple[str, ...] = ("softmax", "bce")


def cb_weights(class_counts: Any, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights of Cui et al.: (1 - beta) / (1 - beta^n_k), normalised to sum to C.

    The normalisation to sum C follows Cui et al.'s released code (the paper, footnote 3, notes the
    consequence: as beta -> 1 the weight tends to N_bar / n_k with N_bar the harmonic mean of the
    counts, eq. 8). ``beta == 1`` is accepted and gives exactly that limit. Computed in float64,
    returned as float32 (C,).
    """
    if isinstance(class_counts, torch.Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    n = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    if n.size == 0:
        raise WbsweepError("cb_weights needs at least one class count")
    if np.any(n < 1) or not np.all(np.isfinite(n)):
        raise WbsweepError("class-balanced weights need at least one training sample in every class")
    if not 0.0 <= beta <= 1.0:
        raise WbsweepError(f"class-balanced beta must lie in [0, 1], got {beta}")
    raw = 1.0 / n if beta == 1.0 else (1.0 - beta) / (1.0 - np.power(beta, n))
    weights = raw / raw.sum() * n.size
    return torch.as_tensor(weights, dtype=torch.float32)


def class_balanced_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    form: str = "softmax",
) -> torch.Tensor:
    """Class-balanced loss with per-class ``weights`` (C,) (from :func:`cb_weights`).

    * ``"softmax"``: (1/N) sum_i w_{y_i} CE(z_i, y_i), paper eq. 8 and F_WB. This is deliberately
      *not* ``F.cross_entropy(weight=...)``, which divides by sum_i w_{y_i} instead of N and so
      undoes the reweighting's effect on the loss scale.
    * ``"bce"``: the weight-balancing authors' code (after Cui et al.'s "softmax" variant): binary
      cross-entropy between the softmax probabilities and one-hot targets, every element of sample
      i's row weighted by w_{y_i}, averaged over all N*C elements, so it is roughly 1/C the scale of
      the softmax form. ``F.binary_cross_entropy`` is used, so log terms are clamped at -100 as there.
    """
    if form not in CB_FORMS:
        raise WbsweepError(f"unknown class-balanced loss form {form!r}; expected one of {list(CB_FORMS)}")
    w = weights.to(device=logits.device, dtype=logits.dtype)
    sample_w = w[targets]
    if form == "softmax":
        return (sample_w * F.cross_entropy(logits, targets, reduction="none")).mean()
    probs = logits.softmax(dim=1)
    one_hot = F.one_hot(targets, num_classes=logits.shape[1]).to(probs.dtype)
    elem_w = sample_w[:, None].expand_as(probs)
    return F.binary_cross_entropy(probs, one_hot, weight=elem_w, reduction="mean")


def feature_regularisation(features: torch.Tensor, zeta: float) -> torch.Tensor:
    """Feature regularisation (FR), paper eq. 5: zeta/2 * (1/N) sum_i ||g(x_i)||^2.

    ``features`` are the classifier's inputs g(x) (N, d); extra trailing dimensions are flattened.
    """
    flat = features.reshape(features.shape[0], -1)
    return 0.5 * zeta * flat.pow(2).sum(dim=1).mean()


def dot_regression_loss(
    features: torch.Tensor,
    class_weights: torch.Tensor,
    targets: torch.Tensor,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Dot-regression (DR) loss of Yang et al. (2022), used with the ETF classifier ("WD&ETF&DR").

    Per sample: (w_y^T h - ||w_y|| ||h||)^2 / (2 ||w_y|| ||h||) with both norms detached, averaged
    over the batch. Detaching makes the per-sample gradient w.r.t. h equal to (cos(w_y, h) - 1) w_y:
    a pull of h along its own class vector only, with no gradient through the norms and without
    CE's push away from the other classes' vectors. ``class_weights`` is (C, d) like
    ``nn.Linear.weight``. The product of norms is clamped at ``eps`` so a zero feature (dead ReLUs)
    gives loss 0 instead of nan.
    """
    w = class_weights[targets]
    h = features.reshape(features.shape[0], -1)
    dot = (w * h).sum(dim=1)
    norm_prod = (w.detach().norm(dim=1) * h.detach().norm(dim=1)).clamp_min(eps)
    return ((dot - norm_prod).pow(2) / (2.0 * norm_prod)).mean()
