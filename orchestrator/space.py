"""Spec search entries as Optuna distributions (used by the tune stages of :mod:`orchestrator.graph`)."""

from __future__ import annotations

from typing import Any


def optuna_space(search: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Spec search entries -> Optuna distributions."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    space: dict[str, Any] = {}
    for knob, dist in search.items():
        kind, args = next(iter(dist.items()))
        if kind == "loguniform":
            space[knob] = FloatDistribution(float(args[0]), float(args[1]), log=True)
        elif kind == "uniform":
            space[knob] = FloatDistribution(float(args[0]), float(args[1]))
        elif kind == "grid":
            space[knob] = FloatDistribution(float(args[0]), float(args[1]), step=float(args[2]))
        else:
            space[knob] = CategoricalDistribution(list(args))
    return space
