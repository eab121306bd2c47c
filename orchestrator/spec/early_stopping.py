"""Early stopping of hopeless tune-stage trials: Ray Tune's asynchronous successive halving (ASHA).

ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020) compares a
trial at *rungs* of its training: at epoch ``grace_period``, ``grace_period * reduction_factor``,
... (each before the stage's last epoch), a trial whose metric is below the top
``1 / reduction_factor`` of the trials that reached that rung before it is stopped; the others go
on. The halving itself is Ray Tune's :class:`~ray.tune.schedulers.ASHAScheduler`, run per tune stage by
:mod:`orchestrator.sweep.scheduler`; this module (the settings, no Ray)
chooses where it applies:

* only tune stages are pruned: a repeat stage's trials always run to their last epoch (they are
  the seeds the tables average);
* each tune stage has its own ASHA, so a method is only compared with trials of its own search
  (methods' accuracies differ) and the rungs follow its own epochs (a WB second stage trains
  ``stage2_epochs``);
* the metric is the epoch's validation balanced accuracy (``val_acc``: no LA, the trainer's
  per-epoch number), higher is better;
* a stopped trial is *pruned*: the Optuna study records it PRUNED (with its last value as an
  intermediate value at its epoch), the ``trials/`` Parquet has a row with ``pruned`` true, its
  MLflow run ends with the tag ``wbsweep.pruned``; it counts towards the stage's trial budget and is
  never chosen (only trials that finished compete). A resumed search keeps its pruned trials.

The spec chooses it per preset (or variant)::

    search_scheduler: asha                    # the defaults below
    search_scheduler: {name: asha, grace_period: 5, reduction_factor: 3, metric: val_acc}
    search_scheduler: none                    # every search trial runs in full (the default)

``grace_period``: epochs (a whole number >= 1) before the first rung; when left out, 1/8 of the
stage's epochs (rounded up). ``reduction_factor``: a number > 1 (default 3): 1/reduction_factor of
the trials go on at each rung. A stage with no rung before its last epoch is not pruned.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from trainables.errors import WbsweepError


class HasSettings(Protocol):
    """An :class:`~orchestrator.spec.experiment.Experiment` as this module sees it."""

    search_scheduler: dict[str, Any] | None

SCHEDULERS = ("none", "asha")
METRICS = ("val_acc",)  # the per-epoch validation balanced accuracy the trainer reports
DEFAULT_REDUCTION_FACTOR = 3
DEFAULT_GRACE_FRACTION = 1 / 8
KEYS = {"name", "grace_period", "reduction_factor", "metric"}


def parse(value: Any, where: str) -> dict[str, Any] | None:
    """The preset's ``search_scheduler`` as ``{name, grace_period, reduction_factor, metric}``, or
    None for ``none`` (or when absent). Bad values raise :class:`WbsweepError` with one line."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise WbsweepError(f"{where}: search_scheduler must be one of {', '.join(SCHEDULERS)}, or a mapping "
                           "{name: asha, grace_period: EPOCHS, reduction_factor: N, metric: val_acc}.")
    unknown = set(value) - KEYS
    if unknown:
        raise WbsweepError(f"{where}: search_scheduler has unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                           f"allowed: {', '.join(sorted(KEYS))}.")
    name = value.get("name", "asha")
    if name not in SCHEDULERS:
        raise WbsweepError(f"{where}: search_scheduler '{name}' is not one of {', '.join(SCHEDULERS)}.")
    if name == "none":
        if set(value) - {"name"}:
            raise WbsweepError(f"{where}: search_scheduler none takes no options (got "
                               f"{', '.join(sorted(set(value) - {'name'}))}).")
        return None
    grace = value.get("grace_period")
    if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int) or grace < 1):
        raise WbsweepError(f"{where}: search_scheduler.grace_period must be a whole number of epochs >= 1, "
                           f"got {grace!r}.")
    rf = value.get("reduction_factor", DEFAULT_REDUCTION_FACTOR)
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 1 or not math.isfinite(rf):
        raise WbsweepError(f"{where}: search_scheduler.reduction_factor must be a number above 1, got {rf!r}.")
    metric = value.get("metric", METRICS[0])
    if metric not in METRICS:
        raise WbsweepError(f"{where}: search_scheduler.metric '{metric}' is not one of {', '.join(METRICS)} "
                           "(the epoch's validation balanced accuracy).")
    return {"name": name, "grace_period": grace, "reduction_factor": rf, "metric": metric}


def settings(exp: HasSettings) -> dict[str, Any] | None:
    """The experiment's early-stopping settings (None: tune trials run in full)."""
    return exp.search_scheduler


def early_stopping(exp: HasSettings) -> bool:
    """Whether the tune stages of ``exp`` are pruned. Their trials must then be one model per Ray
    trial (ASHA stops a Ray trial as a whole): such tune stages are not fused."""
    return settings(exp) is not None


def grace_epochs(s: dict[str, Any], epochs: int) -> int:
    """The first rung, in epochs: the spec's grace_period, else 1/8 of the stage's ``epochs``."""
    return int(s["grace_period"]) if s.get("grace_period") else max(1, math.ceil(epochs * DEFAULT_GRACE_FRACTION))


def rungs(s: dict[str, Any] | None, epochs: int) -> list[int]:
    """The epochs at which a trial of ``epochs`` epochs is compared: grace * rf**k before its last
    epoch (ASHA's rungs; none at the last epoch, so a trial that gets there always finishes)."""
    if s is None:
        return []
    out, m, rf = [], float(grace_epochs(s, epochs)), float(s["reduction_factor"])
    while m < epochs:
        out.append(int(math.ceil(m)))
        m *= rf
    return sorted(set(out))


#: The trial arrivals :func:`expected_epochs` simulates at most: 200 orders of 500 trials, the
#: precision of its average (standard error ~ 1/sqrt(arrivals)) whatever the budget.
SIMULATED_ARRIVALS = 100_000
#: Random orders averaged over (fewer where the budget is large: see SIMULATED_ARRIVALS).
SIMULATED_ORDERS = 200


def expected_epochs(s: dict[str, Any] | None, epochs: int, trials: int | None = None) -> float:
    """Epochs per trial under successive halving. Without ``trials``: the nominal budget, all trials
    reach the first rung, 1/rf of them the next, ... (Li et al. 2020). With ``trials``: the
    asynchronous version as Ray's ASHA runs it on a search of that many trials arriving one after
    the other (a trial goes on when it is not below the (1 - 1/rf) percentile of those that reached
    the rung before it, so early arrivals go on more often), averaged over random orders of
    independent trial qualities (seeded: the same figure every time). Ties (coarse validation
    accuracy) let still more through; docs/performance.md compares this with measured searches.

    The work is bounded whatever the budget: each rung keeps its values in two heaps (the cutoff
    is read, not recomputed from every value), and at most ``SIMULATED_ARRIVALS`` arrivals are
    simulated: 200 orders up to 500 trials, fewer orders beyond (the average over one order of
    many trials is already that precise); past that many arrivals in one order, a trial is counted
    at the nominal budget, which is what the asynchronous halving tends to once each rung has
    recorded that many trials (the cutoffs are then the synchronous ones)."""
    marks = rungs(s, epochs)
    if not marks:
        return float(epochs)
    rf = float(s["reduction_factor"])
    if trials is None:
        total, prev, share = 0.0, 0, 1.0
        for m in marks:
            total += share * (m - prev)
            prev, share = m, share / rf
        return total + share * (epochs - prev)
    import numpy as np

    trials = int(trials)
    if trials < 1:
        return float(epochs)
    runs = max(1, min(SIMULATED_ORDERS, -(-SIMULATED_ARRIVALS // trials)))
    simulated = min(trials, SIMULATED_ARRIVALS)
    q = (1 - 1 / rf) * 100 / 100  # as numpy.nanpercentile divides the percentile
    rng = np.random.default_rng(0)
    total = runs * (trials - simulated) * expected_epochs(s, epochs)  # the arrivals past SIMULATED_ARRIVALS
    for _ in range(runs):
        values = rng.random(simulated).tolist()
        recorded = [_RunningQuantile(q) for _ in marks]
        for v in values:
            reached = epochs
            for i, m in enumerate(marks):
                cutoff = recorded[i].value()
                recorded[i].add(v)
                if cutoff is not None and v < cutoff:
                    reached = m
                    break
            total += reached
    return total / (runs * trials)


class _RunningQuantile:
    """The ``q`` quantile of a growing list of numbers, as ``numpy.percentile`` (linear
    interpolation) computes it, in O(log n) per number added: the ``lo + 1`` smallest numbers in
    a max-heap, the others in a min-heap, where ``lo`` is the interpolation's lower index."""

    def __init__(self, q: float):
        self.q, self.low, self.high, self.n = q, [], [], 0  # low holds negated numbers

    def _index(self, n: int) -> tuple[int, float]:
        virtual = n * self.q + (1 + self.q * (1 - 1 - 1)) - 1  # numpy's _compute_virtual_index (linear)
        lower = math.floor(virtual)
        return min(max(lower, 0), n - 1), virtual - lower

    def value(self) -> float | None:
        if not self.n:
            return None
        lower, gamma = self._index(self.n)
        a = -self.low[0]
        b = self.high[0] if self.high and lower + 1 <= self.n - 1 else a
        diff = b - a
        return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma  # numpy's _lerp

    def add(self, v: float) -> None:
        import heapq

        if self.low and v < -self.low[0]:
            heapq.heappush(self.low, -v)
        else:
            heapq.heappush(self.high, v)
        self.n += 1
        want = self._index(self.n)[0] + 1
        while len(self.low) > want:
            heapq.heappush(self.high, -heapq.heappop(self.low))
        while len(self.low) < want:
            heapq.heappush(self.low, -heapq.heappop(self.high))


def key(exp: HasSettings) -> dict[str, Any]:
    """What early stopping adds to a tune stage's identity (its study and recorded choice): nothing
    when off, so the stages recorded before this option existed are found again."""
    s = settings(exp)
    return {} if s is None else {"scheduler": {k: v for k, v in s.items() if v is not None}}


def stage_epochs(cfg: dict[str, Any]) -> int:
    """The epochs a training config trains (a WB second stage: ``stage2_epochs``)."""
    from trainables.config import DEFAULTS

    if cfg.get("stage2"):
        return int(cfg.get("stage2_epochs", DEFAULTS["stage2_epochs"]))
    return int(cfg.get("epochs", DEFAULTS["epochs"]))


def report_epochs(exp: HasSettings, cfg: dict[str, Any]) -> dict[str, Any]:
    """Trial-config keys for a tune trial: the rungs, at which its per-epoch report is never
    throttled (trainables.trial.ThrottledReport), so ASHA compares every trial at the same epoch."""
    marks = rungs(settings(exp), stage_epochs(cfg))
    return {"_report_epochs": marks} if marks else {}
