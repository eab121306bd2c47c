"""Spec search entries as Optuna distributions, and the points of a discrete space (used by the tune
stages of :mod:`orchestrator.sweep.graph`)."""

from __future__ import annotations

import itertools
import random
from typing import Any

from trainables.config import is_number


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
            space[knob] = FloatDistribution(float(args[0]), grid_values(args)[-1], step=float(args[2]))
        else:
            space[knob] = CategoricalDistribution(list(args))
    return space


def grid_values(args: list) -> list[float]:
    """The points of a ``{grid: [lo, hi, step]}`` entry: lo, lo + step, ..., hi (rounded to 12
    decimals, so 0.01 * 3 is 0.03 and matches what Optuna's stepped distribution holds)."""
    lo, hi, step = (float(a) for a in args)
    return [round(lo + i * step, 12) for i in range(int(round((hi - lo) / step)) + 1)]


def point_key(params: dict[str, Any]) -> tuple:
    """A hashable form of a searched point, numbers rounded, to tell whether it was evaluated."""
    return tuple(sorted((k, round(float(v), 9) if is_number(v) else v) for k, v in params.items()))


def discrete_points(search: dict[str, dict[str, Any]], budget: int, seed: int) -> list[dict[str, Any]] | None:
    """For a space whose every knob is discrete (``grid`` or ``choice``): the points to evaluate,
    each once. The whole grid when it fits in ``budget`` (the paper's "s chosen from {0.01, ...,
    0.20}" evaluates all 20); else ``budget`` distinct points drawn with ``seed`` (a sampler such as
    TPE would propose some values twice: 20 TPE trials reach 12-15 of 20 values). None when a knob is
    continuous: the sampler searches as usual."""
    axes = []
    for knob, dist in search.items():
        kind, args = next(iter(dist.items()))
        if kind == "grid":
            axes.append([(knob, v) for v in grid_values(args)])
        elif kind == "choice":
            axes.append([(knob, v) for v in args])
        else:
            return None
    points = [dict(p) for p in itertools.product(*axes)]
    return points if len(points) <= budget else random.Random(seed).sample(points, budget)
