"""The Ray Tune scheduler of a sweep: one ASHA per tune stage (early stopping), FIFO for the rest.

Which trials are compared and where is decided by the spec's settings
(:mod:`orchestrator.spec.early_stopping`); this module runs them: :class:`StageScheduler` keeps one
:class:`~ray.tune.schedulers.ASHAScheduler` per tune stage (by the trial config's ``_stage``), its
``time_attr`` the epoch; every other trial (repeat stages) always CONTINUEs. What it stopped is in
:attr:`StageScheduler.pruned`, which the graph (the Optuna trial ends PRUNED) and the callbacks (a
``trials/`` row with ``pruned`` true, the MLflow run's tags) read.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from orchestrator._adapters.ray_tune import asha_complete, asha_remove
from orchestrator.spec.early_stopping import HasSettings, rungs, settings, stage_epochs
from trainables.trial import training_config


def stage_scheduler(exp: HasSettings) -> StageScheduler | None:
    """The scheduler of a sweep of ``exp``, or None when nothing is pruned (Ray Tune's FIFO)."""
    s = settings(exp)
    return None if s is None else StageScheduler(s)


class StageScheduler(FIFOScheduler):
    """One ASHA per tune stage; :attr:`pruned` maps the id of each trial it stopped to the epoch it
    stopped at."""

    _supports_buffered_results = False  # a decision per report, as ASHA's

    def __init__(self, s: dict[str, Any]):
        super().__init__()  # FIFOScheduler's: it picks the trials to run
        self.settings = s
        self.asha: dict[str, ASHAScheduler | None] = {}  # stage key -> its ASHA (None: no rung before the last epoch)
        self.of_trial: dict[str, ASHAScheduler] = {}  # trial id -> its stage's ASHA
        self.pruned: dict[str, int] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # each stage's ASHA has its own metric (val_acc) and mode (max)

    def _stage_asha(self, trial) -> ASHAScheduler | None:
        stage = str(trial.config.get("_stage", ""))
        if not stage.startswith("tune:"):
            return None
        if stage not in self.asha:
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
        if asha is not None:
            asha_complete(asha, tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        asha = self.of_trial.pop(trial.trial_id, None)
        if asha is not None:
            asha_remove(asha, tune_controller, trial)

    def debug_string(self) -> str:
        return f"wbsweep StageScheduler: ASHA per tune stage, {len(self.pruned)} trial(s) pruned"
