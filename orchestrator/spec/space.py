"""Spec search entries as Optuna distributions, and the points of a discrete space (used by the tune
stages of :mod:`orchestrator.sweep.graph`)."""

from __future__ import annotations

import math
import random
import sys
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
            space[knob] = FloatDistribution(float(args[0]), grid_value(args, grid_size(args) - 1), step=float(args[2]))
        else:
            space[knob] = CategoricalDistribution(list(args))
    return space


def grid_size(args: list) -> int:
    """How many points a ``{grid: [lo, hi, step]}`` entry has (lo, lo + step, ..., hi)."""
    lo, hi, step = (float(a) for a in args)
    return int(round((hi - lo) / step)) + 1


def grid_value(args: list, i: int) -> float:
    """The ``i``-th point of a grid entry, rounded to 12 decimals (so 0.01 * 3 is 0.03 and matches
    what Optuna's stepped distribution holds)."""
    lo, _, step = (float(a) for a in args)
    return round(lo + i * step, 12)


def grid_values(args: list) -> list[float]:
    """The points of a ``{grid: [lo, hi, step]}`` entry: lo, lo + step, ..., hi."""
    return [grid_value(args, i) for i in range(grid_size(args))]


def point_key(params: dict[str, Any]) -> tuple:
    """A hashable form of a searched point, numbers rounded, to tell whether it was evaluated."""
    return tuple(sorted((k, round(float(v), 9) if is_number(v) else v) for k, v in params.items()))


def _axes(search: dict[str, dict[str, Any]]) -> list[tuple[str, int, Any]] | None:
    """(knob, points, the i-th point) per knob of a discrete space; None when a knob is continuous."""
    axes: list[tuple[str, int, Any]] = []
    for knob, dist in search.items():
        kind, args = next(iter(dist.items()))
        if kind == "grid":
            axes.append((knob, grid_size(args), lambda i, args=args: grid_value(args, i)))
        elif kind == "choice":
            axes.append((knob, len(args), lambda i, args=args: args[i]))
        else:
            return None
    return axes


def discrete_size(search: dict[str, dict[str, Any]]) -> int | None:
    """The number of points of a discrete space (every knob ``grid`` or ``choice``), without listing
    them; None when a knob is continuous."""
    axes = _axes(search)
    return None if axes is None else math.prod(n for _, n, _ in axes)


def discrete_points(search: dict[str, dict[str, Any]], budget: int, seed: int) -> list[dict[str, Any]] | None:
    """For a space whose every knob is discrete (``grid`` or ``choice``): the points to evaluate,
    each once. The whole grid when it fits in ``budget`` (the paper's "s chosen from {0.01, ...,
    0.20}" evaluates all 20); else ``budget`` distinct points drawn with ``seed`` (a sampler such as
    TPE would propose some values twice: 20 TPE trials reach 12-15 of 20 values). None when a knob is
    continuous: the sampler searches as usual.

    The work is proportional to the points returned, not to the size of the space: the points are
    drawn as positions in the space's product order (the last knob fastest, as ``itertools.product``
    lists them) and only those are built; the same ``seed`` draws the same points as listing the
    whole space and sampling from it (``random.sample`` picks positions the same way)."""
    axes = _axes(search)
    if axes is None:
        return None
    size = math.prod(n for _, n, _ in axes)
    if size <= budget:
        chosen: Any = range(size)
    elif size <= sys.maxsize:  # a range longer than that has no len(): drawn one position at a time
        chosen = random.Random(seed).sample(range(size), budget)
    else:
        rng, drawn = random.Random(seed), dict.fromkeys(())
        while len(drawn) < budget:
            drawn[rng.randrange(size)] = None
        chosen = list(drawn)
    points = []
    for position in chosen:
        point: dict[str, Any] = {}
        for knob, n, value in reversed(axes):
            position, i = divmod(position, n)
            point[knob] = value(i)
        points.append({knob: point[knob] for knob, _, _ in axes})
    return points
