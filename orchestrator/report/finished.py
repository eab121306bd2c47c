"""What of a sweep is already done, as the sweep itself would find it: for ``run --plan``.

A model counts as finished only where its config hash (data included) is, exactly as a run finds
it (orchestrator/sweep/stages.py): per method, the config hash the spec resolves to now
(:mod:`orchestrator.record.current`), then

* a repeat stage's seed is done when ``results/`` has its rows for this spec and preset, or its
  run folder ``runs/<hash>/seed<k>`` holds a finished model (one another spec trained: reused);
* a tune stage is done when its choice is recorded (``DIR/stages/tune-<method>-<key>.json``);
  otherwise the finished and pruned trials of its Optuna study (``DIR/optuna.db``, read only) count
  towards its budget, as a resumed search counts them.

After an edit of ``epochs`` or ``wd``, or on other data, nothing matches and everything is counted,
as the run will train everything. Nothing is written; no Ray is started.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.record.current import CurrentConfigs, MethodConfig, current_configs
from orchestrator.spec import configs
from orchestrator.spec.experiment import Stage
from orchestrator.spec.space import discrete_size
from trainables import storage


class Finished:
    """The finished work of one experiment (a preset or one of its variants) in a results folder."""

    def __init__(self, exp, store: str | None, out: Path | None, data_root: str | None = None):
        self.exp, self.store, self.out = exp, store, out
        self.notes: list[str] = []
        self.current: CurrentConfigs | None = None
        self.rows: set[tuple[str, str, int]] = set()  # (method, config hash, seed) with rows of this spec and preset
        if store is None:
            return
        from orchestrator.record.results import read_rows

        df = read_rows(storage.join(store, "results"))
        df = df[(df["spec"] == exp.name) & (df["preset"] == exp.preset)]
        self.rows = set(zip(df["method"], df["config_hash"], df["seed"].astype(int), strict=True))
        self.current = current_configs([exp], out or Path(store), storage.join(store, "runs"), data_root, df)
        self.notes = list(self.current.notes)

    def method(self, name: str) -> MethodConfig | None:
        if self.current is None:
            return None
        return next((m for m in self.current.methods if m.method == name), None)

    def planned(self, stage: Stage) -> int:
        """The trials a stage runs at most: a tune stage over a discrete space smaller than its
        budget evaluates each point once (orchestrator/sweep/stages.py ``open_study``)."""
        if stage.kind != "tune":
            return stage.trials
        size = discrete_size(self.exp.searched_for(stage.entry.method))
        return stage.trials if size is None else min(stage.trials, size)

    def tune_done(self, stage: Stage) -> int:
        """The trials of a tune stage that need not run again."""
        mc = self.method(stage.entry.method.name)
        if mc is None or mc.tune_key is None:  # nothing here, or its base (a parent's choice) is not known yet
            return 0
        if mc.config_hash is not None:  # its choice is recorded
            return self.planned(stage)
        return self.study_trials(f"{self.exp.name}-{mc.method}-{mc.tune_key}", mc.method)

    def repeat_left(self, stage: Stage) -> int:
        """The seeds of a repeat stage still to train."""
        entry = stage.entry
        tuned = configs.is_tuned(self.exp, entry)
        mc = self.method(entry.method.name)
        if mc is None or mc.config_hash is None:
            # the config is not chosen yet: the first seed's model is the chosen tune trial's own (reused)
            return max(0, stage.trials - int(tuned))
        runs = storage.join(self.store, "runs")
        return sum(1 for seed in self.exp.seeds if (mc.method, mc.config_hash, int(seed)) not in self.rows
                   and not _finished(runs, mc.config_hash, seed))

    def study_trials(self, name: str, method: str) -> int:
        """The finished and pruned trials of the Optuna study ``name`` in ``DIR/optuna.db``, read
        without writing (0 where there is no such store or study)."""
        db = (self.out or Path(str(self.store))) / "optuna.db"
        if not db.is_file():
            return 0
        import optuna
        from optuna.trial import TrialState

        try:
            store = optuna.storages.RDBStorage(f"sqlite:///file:{db.resolve()}?mode=ro&uri=true",
                                               skip_table_creation=True)
            if name not in {s.study_name for s in store.get_all_studies()}:
                return 0
            study = store.get_study_id_from_name(name)
            n = len(store.get_all_trials(study, deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
            store.remove_session()
            return n
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read: the stage is counted in full
            self.notes.append(f"{db} could not be read ({str(exc).splitlines()[0]}): the search of {method} is "
                              "counted in full")
            return 0


def _finished(runs: str, config_hash: str, seed: int) -> bool:
    from trainables.run_files import load_metrics

    return load_metrics(storage.run_location(runs, config_hash, seed)) is not None
