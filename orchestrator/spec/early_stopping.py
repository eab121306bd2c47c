"""Early stopping of hopeless tune-stage trials: Ray Tune's asynchronous successive halving (ASHA).

ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020) compares a
trial at *rungs* of its training: at epoch ``grace_period``, ``grace_period * reduction_factor``,
... (each before the stage's last epoch), a trial whose metric is below the top
``1 / reduction_factor`` of the trials that reached that rung before it is stopped; the others go
on. The halving itself is Ray Tune's :class:`~ray.tune.schedulers.ASHAScheduler`; this module
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
from typing import TYPE_CHECKING, Any

from trainables.errors import WbsweepError

if TYPE_CHECKING:
    from orchestrator.spec.experiment import Experiment

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


def settings(exp: Experiment) -> dict[str, Any] | None:
    """The experiment's early-stopping settings (None: tune trials run in full)."""
    return getattr(exp, "search_scheduler", None)


def early_stopping(exp: Experiment) -> bool:
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


def expected_epochs(s: dict[str, Any] | None, epochs: int, trials: int | None = None) -> float:
    """Epochs per trial under successive halving. Without ``trials``: the nominal budget, all trials
    reach the first rung, 1/rf of them the next, ... (Li et al. 2020). With ``trials``: the
    asynchronous version as Ray's ASHA runs it on a search of that many trials arriving one after
    the other (a trial goes on when it is not below the (1 - 1/rf) percentile of those that reached
    the rung before it, so early arrivals go on more often), averaged over random orders of
    independent trial qualities (seeded: the same figure every time). Ties (coarse validation
    accuracy) let still more through; docs/performance.md compares this with measured searches."""
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

    rng, runs, total = np.random.default_rng(0), 200, 0.0
    for _ in range(runs):
        values = rng.random(trials)
        recorded: list[list[float]] = [[] for _ in marks]
        for v in values:
            reached = epochs
            for i, m in enumerate(marks):
                cutoff = np.nanpercentile(recorded[i], (1 - 1 / rf) * 100) if recorded[i] else None
                recorded[i].append(v)
                if cutoff is not None and v < cutoff:
                    reached = m
                    break
            total += reached
    return total / (runs * trials)


def key(exp: Experiment) -> dict[str, Any]:
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


def report_epochs(exp: Experiment, cfg: dict[str, Any]) -> dict[str, Any]:
    """Trial-config keys for a tune trial: the rungs, at which its per-epoch report is never
    throttled (trainables.trial.ThrottledReport), so ASHA compares every trial at the same epoch."""
    marks = rungs(settings(exp), stage_epochs(cfg))
    return {"_report_epochs": marks} if marks else {}


# --- the scheduler ----------------------------------------------------------------------------------


def stage_scheduler(exp: Experiment):
    """The Ray Tune scheduler of a sweep of ``exp`` (a ``StageScheduler``), or None when nothing is
    pruned. The class is made on first use: importing this module (the spec does) needs no Ray."""
    s = settings(exp)
    return None if s is None else _scheduler_class()(s)


_CLASS: list[type] = []


def _scheduler_class() -> type:
    if not _CLASS:
        from ray.tune.schedulers import FIFOScheduler

        _CLASS.append(type("StageScheduler", (_StageScheduler, FIFOScheduler), {}))
    return _CLASS[0]


class _StageScheduler:
    """One :class:`~ray.tune.schedulers.ASHAScheduler` per tune stage (by the trial config's
    ``_stage``), its ``time_attr`` the epoch; every other trial (repeat stages) always CONTINUEs.
    :attr:`pruned` maps the id of each trial it stopped to the epoch it stopped at."""

    _supports_buffered_results = False  # a decision per report, as ASHA's

    def __init__(self, s: dict[str, Any]):
        super().__init__()  # FIFOScheduler's: it picks the trials to run
        self.settings = s
        self.asha: dict[str, Any] = {}  # stage key -> its ASHAScheduler (None: no rung before the last epoch)
        self.of_trial: dict[str, Any] = {}  # trial id -> its stage's ASHAScheduler
        self.pruned: dict[str, int] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # each stage's ASHA has its own metric (val_acc) and mode (max)

    def _stage_asha(self, trial):
        stage = str(trial.config.get("_stage", ""))
        if not stage.startswith("tune:"):
            return None
        if stage not in self.asha:
            from ray.tune.schedulers import ASHAScheduler

            from trainables.trial import training_config

            epochs = stage_epochs(training_config(trial.config))
            marks = rungs(self.settings, epochs)
            # max_t below the last epoch and stop_last_trials off: no rung at the last epoch, so a
            # trial that reaches it always sends its final report (the LA and test evaluation).
            self.asha[stage] = ASHAScheduler(
                time_attr="epoch", metric=self.settings["metric"], mode="max", max_t=max(marks[-1], epochs - 1),
                grace_period=marks[0], reduction_factor=self.settings["reduction_factor"], stop_last_trials=False,
            ) if marks else None
        return self.asha[stage]

    def on_trial_add(self, tune_controller, trial) -> None:
        asha = self._stage_asha(trial)
        if asha is not None:
            self.of_trial[trial.trial_id] = asha
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        asha = self.of_trial.get(trial.trial_id)
        if asha is None or "final" in result or any(str(k).startswith("final/") for k in result):
            return self.CONTINUE
        decision = asha.on_trial_result(tune_controller, trial, result)
        if decision == self.STOP:
            self.pruned[trial.trial_id] = int(result["epoch"])
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        asha = self.of_trial.pop(trial.trial_id, None)
        if asha is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_complete(tune_controller, trial, result)
            asha._trial_info.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial) -> None:
        asha = self.of_trial.pop(trial.trial_id, None)
        if asha is not None:
            asha._trial_info.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        return f"wbsweep StageScheduler: ASHA per tune stage, {len(self.pruned)} trial(s) pruned"


def pruned_epoch(sweep, trial_id: str) -> int | None:
    """The epoch at which the sweep's scheduler stopped ``trial_id``, or None (not pruned)."""
    scheduler = getattr(sweep, "scheduler", None)
    return None if scheduler is None else scheduler.pruned.get(trial_id)


# --- recording a pruned trial ------------------------------------------------------------------------


def tell_pruned(search, trial_id: str, result: dict | None, epoch: int) -> None:
    """End the Optuna trial behind Ray's OptunaSearch ``search`` PRUNED, with the metric at ``epoch``
    as its intermediate value (Optuna's own record of where a pruned trial stood)."""
    ot_trial = getattr(search, "_ot_trials", {}).get(trial_id)
    value = (result or {}).get("val_acc")
    if ot_trial is not None and value is not None:
        ot_trial.report(float(value), int(epoch))
        ot_trial.set_user_attr("pruned_epoch", int(epoch))
    search.on_trial_complete(trial_id, result=None, error=False)  # no value and no error: PRUNED


def record_pruned(callback, trial, epoch: int) -> None:
    """The driver's record of a pruned trial (called by the trial callback): a ``trials/`` row per LA
    variant with ``pruned`` true, the epochs it trained, its validation accuracy there and no test
    numbers; its MLflow run ends FINISHED with ``wbsweep.pruned`` = true and ``wbsweep.pruned_epoch``."""
    import pandas as pd

    from orchestrator.record.results import rows_for_run, write_rows
    from trainables.config import config_hash
    from trainables.trial import training_config

    sweep = callback.sweep
    node = sweep.graph.node_of(trial.config)
    last = trial.last_result or {}
    cfg = training_config(trial.config)
    hash_, val = config_hash(cfg), last.get("val_acc")
    blank = {"many": None, "medium": None, "few": None, "avg": None, "acc_per_class": None, "param": None}
    metrics = {"config_hash": hash_, "la": {la: {**blank, "val_acc": val} for la in cfg["la"]},
               "fdr_train": None, "fdr_test": None, "epochs": int(epoch), "best_epoch": None,
               "train_seconds": last.get("time_total_s"), "node": last.get("hostname"), "device": cfg["device"],
               "data_fingerprint": cfg.get("data_fingerprint"),
               "ray_node_id": sweep.run_file(hash_, cfg["seed"], "ray_node_id")}
    rows = rows_for_run(metrics, cfg, spec=sweep.exp.name, preset=sweep.exp.preset, method=node.method,
                        stage=node.kind, mlflow_run_id=callback.run_ids.get(trial.trial_id), versions=sweep.versions,
                        created_at=pd.Timestamp.now(tz="UTC").floor("s"))
    for row in rows:  # only the plain (no LA) validation accuracy is measured per epoch
        row.update(objective=None, pruned=True, val_acc=val if row["la"] == "none" else None)
    name = f"{sweep.exp.name}-{sweep.exp.preset}-{node.method}-{hash_}-s{cfg['seed']}"
    write_rows(sweep.location("trials"), name, rows)
    tracker = sweep.tracker
    tags = {"wbsweep.pruned": "true", "wbsweep.pruned_epoch": str(int(epoch))}

    def end(run_id: str) -> None:
        for k, v in tags.items():
            tracker.client.set_tag(run_id, k, v)
        tracker.finish(run_id)

    callback.for_run(trial.trial_id, "the end of a pruned run", end)
    callback.open.discard(trial.trial_id)
    callback.logged_epochs.pop(trial.trial_id, None)
    sweep.progress.done(trial.trial_id)
