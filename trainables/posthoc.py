"""Post-hoc logit adjustment (LA), evaluated on stored logits without retraining.

The paper applies LA after training every model (Tables 1-2, "+LA" columns): additive LA (Menon et
al., eq. 10) with tau on a grid 1.00..2.00 and multiplicative LA (Kim & Kim, eq. 9) with gamma on a
grid 0.00..1.00, the value chosen on validation balanced accuracy. Since both are deterministic maps
of the logits (given the classifier's bias and row norms), tuning them is a cheap sweep over stored
validation logits; no forward pass is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trainables.errors import WbsweepError
from trainables.metrics import _to_numpy, balanced_accuracy, group_accuracy, per_class_recall

LA_KINDS: tuple[str, ...] = ("none", "add", "mult")
MULT_FORMS: tuple[str, ...] = ("paper", "code")

# Paper grids (appendix 7.2 / docs/DESIGN.md section 4); rounded so that e.g. 1.05 is the float nearest 1.05.
TAU_GRID: tuple[float, ...] = tuple(float(v) for v in np.round(1.0 + 0.05 * np.arange(21), 2))
GAMMA_GRID: tuple[float, ...] = tuple(float(v) for v in np.round(0.05 * np.arange(21), 2))


def _check_la(la: str) -> None:
    if la not in LA_KINDS:
        raise WbsweepError(f"unknown logit adjustment {la!r}; expected one of {list(LA_KINDS)}")


def default_grid(la: str) -> list[float]:
    """The paper's search grid for ``la``: tau for "add", gamma for "mult", empty for "none"."""
    _check_la(la)
    if la == "add":
        return list(TAU_GRID)
    if la == "mult":
        return list(GAMMA_GRID)
    return []


def _prior_array(prior: Any, num_classes: int) -> np.ndarray:
    """Class prior P(Y=k) as float64, normalised to sum to 1 (so raw training counts are accepted).

    Normalising matters for the "paper" multiplicative form, where the bias is added back unscaled:
    a prior scaled by a constant would otherwise change the balance between w_k^T h and b_k.
    """
    p = _to_numpy(prior).astype(np.float64).reshape(-1)
    if p.size != num_classes:
        raise ValueError(f"prior has {p.size} entries but logits have {num_classes} classes")
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise WbsweepError("class prior must be positive for every class (a class has no training samples)")
    return p / p.sum()


def _per_class(values: Any, num_classes: int, name: str, default: float) -> np.ndarray:
    if values is None:
        return np.full(num_classes, default, dtype=np.float64)
    v = _to_numpy(values).astype(np.float64).reshape(-1)
    if v.size != num_classes:
        raise ValueError(f"{name} has {v.size} entries but logits have {num_classes} classes")
    return v


def adjust_logits(
    logits: Any,
    la: str,
    param: float | None,
    prior: Any,
    bias: Any = None,
    weight_norms: Any = None,
    mult_form: str = "paper",
) -> np.ndarray:
    """Apply post-hoc logit adjustment to ``logits`` (N, C); returns a new float64 array.

    * ``"none"``: logits unchanged (``param`` ignored).
    * ``"add"`` (Menon et al., paper eq. 10): z'_k = z_k - tau * log P(Y=k).
    * ``"mult"``, ``mult_form="paper"`` (eq. 9): class k's weight row is normalised to unit norm and
      then scaled by P(Y=k)^(-gamma). With z = W h + b this is
      z'_k = (z_k - b_k) / ||w_k|| * P(Y=k)^(-gamma) + b_k; the bias is left as it is, since eq. 9
      only concerns the weights. ``bias=None`` means no bias (0) and ``weight_norms=None`` means
      unit-norm rows (e.g. the fixed ETF classifier, whose rows have norm 1).
    * ``"mult"``, ``mult_form="code"`` (the authors' released code): z'_k = z_k * P(Y=k)^(-gamma)
      on the raw logits, with neither norm normalisation nor bias handling (``bias`` and
      ``weight_norms`` are ignored).

    ``prior`` may be probabilities or raw training counts; it is normalised to sum to 1.
    """
    _check_la(la)
    if mult_form not in MULT_FORMS:
        raise WbsweepError(f"unknown mult_form {mult_form!r}; expected one of {list(MULT_FORMS)}")
    z = _to_numpy(logits).astype(np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {z.shape}")
    if la == "none":
        return z.copy()
    if param is None:
        raise WbsweepError(f"logit adjustment {la!r} needs a parameter (tau or gamma)")
    num_classes = z.shape[1]
    p = _prior_array(prior, num_classes)
    param = float(param)
    if la == "add":
        return z - param * np.log(p)[None, :]
    scale = p ** (-param)
    if mult_form == "code":
        return z * scale[None, :]
    b = _per_class(bias, num_classes, "bias", 0.0)
    norms = _per_class(weight_norms, num_classes, "weight_norms", 1.0)
    if np.any(norms <= 0):
        raise WbsweepError("multiplicative LA needs non-zero classifier weight norms")
    return (z - b[None, :]) * (scale / norms)[None, :] + b[None, :]


def tune_la(
    val_logits: Any,
    val_labels: Any,
    la: str,
    prior: Any,
    grid: Sequence[float] | None = None,
    bias: Any = None,
    weight_norms: Any = None,
    mult_form: str = "paper",
    num_classes: int | None = None,
) -> tuple[float | None, float]:
    """Choose the LA parameter maximising validation balanced accuracy (percent).

    As in the paper, the value is picked on the validation split (never on test). Ties go to the
    first value in ``grid`` order, so with the default grids the smallest adjustment wins a tie.
    Returns ``(param, val_balanced_accuracy)``; for ``la="none"`` returns ``(None, accuracy)``.
    """
    _check_la(la)
    z = _to_numpy(val_logits)
    if z.ndim != 2:
        raise ValueError(f"val_logits must have shape (N, C), got {z.shape}")
    if z.shape[0] == 0:
        raise WbsweepError("cannot tune logit adjustment on an empty validation set")
    c = z.shape[1] if num_classes is None else num_classes
    if c != z.shape[1]:
        raise ValueError(f"num_classes={c} but val_logits have {z.shape[1]} columns")
    if la == "none":
        return None, balanced_accuracy(z, val_labels, c)
    values = default_grid(la) if grid is None else [float(v) for v in grid]
    if not values:
        raise WbsweepError(f"empty search grid for logit adjustment {la!r}")
    best_param: float | None = None
    best_acc = -np.inf
    for value in values:
        adjusted = adjust_logits(z, la, value, prior, bias, weight_norms, mult_form)
        acc = balanced_accuracy(adjusted, val_labels, c)
        if acc > best_acc:  # strict: the first of equal values is kept
            best_param, best_acc = value, acc
    return best_param, float(best_acc)


def evaluate_la(
    logits: Any,
    labels: Any,
    la: str,
    param: float | None,
    prior: Any,
    groups: Sequence[str] | None = None,
    bias: Any = None,
    weight_norms: Any = None,
    mult_form: str = "paper",
    num_classes: int | None = None,
) -> dict[str, float]:
    """Accuracy (percent) of adjusted logits: keys "avg" and, when ``groups`` is given, "many",
    "medium", "few" (see :func:`trainables.metrics.group_accuracy`).

    Typically called on test logits with the parameter returned by :func:`tune_la` on validation.
    """
    adjusted = adjust_logits(logits, la, param, prior, bias, weight_norms, mult_form)
    c = adjusted.shape[1] if num_classes is None else num_classes
    recall = per_class_recall(adjusted, labels, c)
    if groups is None:
        return {"avg": group_accuracy(recall, ["many"] * c)["avg"]}
    return group_accuracy(recall, groups)
