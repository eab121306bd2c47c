"""Expand an experiment into stages and run them on Ray Tune.

Per method of the spec, in order:

* ``tune``: Ray Tune + OptunaSearch over the knobs the spec searches for this method, objective =
  validation balanced accuracy (the best over the method's LA variants, each with tau/gamma picked
  on validation). Skipped when nothing is searched (the paper preset's fixed lambda and zeta).
* ``repeat``: the chosen config for every seed of the preset, evaluated on test.

A WB-style method (``parent`` set) runs after its parent's repeat stage: each of its trials starts
from the parent's checkpoint of the same seed. Finished models are keyed by config hash and seed
(``DIR/runs/<hash>/seed<k>``) and never trained twice, and a tune stage whose choice is recorded in
``DIR/stages`` is not searched again, so re-running an interrupted sweep resumes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.progress import Progress
from orchestrator.results import read_rows, rows_for_run, write_rows
from orchestrator.spec import Experiment, MethodEntry
from orchestrator.tracking import Tracker
from trainables.config import config_hash
from trainables.errors import WbsweepError
from trainables.methods import method_config
from trainables.train import load_metrics
from trainables.trial import run_dir, training_config, tune_trainable


@dataclass
class Stage:
    kind: str  # "tune" | "repeat"
    entry: MethodEntry
    trials: int  # planned trials (before skipping finished work)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.entry.method.name}"


@dataclass
class SweepOptions:
    out: Path
    tracking_uri: str
    data_root: str | None = None
    address: str | None = None
    device: str = "auto"
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def plan(exp: Experiment) -> list[Stage]:
    """The stages of ``exp`` in the order they run (parents before the methods built on them)."""
    stages: list[Stage] = []
    for entry in exp.methods:
        if exp.searched_for(entry.method) and exp.trials > 0:
            stages.append(Stage("tune", entry, exp.trials))
        stages.append(Stage("repeat", entry, len(exp.seeds)))
    # A method built on another (WB on WD) runs after every first-stage method: stable sort.
    return sorted(stages, key=lambda s: 1 if s.entry.method.parent else 0)


def versions() -> dict[str, str]:
    import ray
    import torch

    try:
        own = metadata.version("wbsweep")
    except metadata.PackageNotFoundError:
        own = "0+unknown"
    return {"wbsweep": own, "torch": torch.__version__, "ray": ray.__version__}


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


class Sweep:
    """Runs the stages of one experiment. Results go to Parquet and MLflow as each trial ends."""

    def __init__(self, exp: Experiment, opts: SweepOptions):
        self.exp, self.opts = exp, opts
        self.out = opts.out
        self.runs = self.out / "runs"
        self.stages = plan(exp)
        self.chosen: dict[str, dict[str, Any]] = {}  # method -> training config (without seed)
        self.versions = versions()
        res = exp.resources
        self.cpus = opts.cpus_per_trial or res.get("cpus_per_trial", 1)
        self.gpus = opts.gpus_per_trial if opts.gpus_per_trial is not None else res.get("gpus_per_trial", 0)
        self.max_concurrent = opts.max_concurrent or res.get("max_concurrent")
        self.max_failures = res.get("max_failures", 0)
        self.progress = Progress(sum(s.trials for s in self.stages), quiet=opts.quiet)
        self.tracker = Tracker(opts.tracking_uri, exp.name, self.out / "mlartifacts")

    # --- configs ---------------------------------------------------------------------------

    def base_config(self, entry: MethodEntry) -> dict[str, Any]:
        """The training config of a method before any search: spec's train options + the method's
        knobs with the preset's fixed hyperparameters."""
        method = entry.method
        cfg: dict[str, Any] = dict(self.exp.train)
        if method.parent:
            cfg = dict(self.chosen[method.parent])
            cfg["parent_hash"] = config_hash(training_config(self.trial_config(cfg, 0)))
        cfg.update(method_config(method, self.exp.hyper))
        cfg["la"] = list(entry.la)
        cfg["device"] = self.opts.device
        cfg["threads"] = max(1, int(self.cpus))
        if self.opts.data_root:
            cfg["data_root"] = str(Path(self.opts.data_root).resolve())
        cfg.update(self.opts.extra)
        return cfg

    def trial_config(self, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
        return {**cfg, "seed": seed, "_runs": str(self.runs.resolve())}

    # --- running -----------------------------------------------------------------------------

    def run(self) -> None:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own progress lines instead of Ray's tables
        import optuna
        import ray

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        if not ray.is_initialized():
            try:
                ray.init(address=self.opts.address, include_dashboard=False, logging_level="ERROR",
                         log_to_driver=False, configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise WbsweepError(f"cannot start or join the Ray cluster at {self.opts.address or 'local'}: "
                                   f"{str(exc).splitlines()[0]}") from None
        if self.gpus and not ray.cluster_resources().get("GPU"):
            raise WbsweepError(f"{self.gpus} GPU(s) per trial asked for, but the Ray cluster has no GPU; "
                               "use --gpus-per-trial 0 or join a cluster with GPUs (--address).")
        for i, stage in enumerate(self.stages, 1):
            self.progress.stage(f"[{i}/{len(self.stages)}] {stage.label}")
            if stage.kind == "tune":
                self.run_tune(stage)
            else:
                self.run_repeat(stage)
        self.progress.finish()

    def _tuner(self, param_space: dict, stage: Stage, parent_run: str, num_samples: int, search_alg=None):
        from ray import tune

        from orchestrator.callbacks import TrialCallback

        callback = TrialCallback(self, stage, parent_run)
        trainable = tune.with_resources(tune_trainable, {"cpu": self.cpus, "gpu": self.gpus})
        name = f"{self.exp.name}-{stage.kind}-{stage.entry.method.name}"
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="objective", mode="max", num_samples=num_samples, search_alg=search_alg,
                max_concurrent_trials=self.max_concurrent, reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str((self.out / "ray").resolve()), callbacks=[callback], verbose=0,
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
            ),
        )
        tuner.fit()
        return callback

    def _parent_run(self, stage: Stage) -> str:
        m = stage.entry.method.name
        tags = {"wbsweep.stage": stage.kind, "wbsweep.method": m, "wbsweep.preset": self.exp.preset}
        return self.tracker.run(f"{stage.kind}/{m}", tags)

    def run_tune(self, stage: Stage) -> None:
        from ray.tune.search.optuna import OptunaSearch

        entry = stage.entry
        base = self.base_config(entry)
        search = self.exp.searched_for(entry.method)
        key = config_hash({"base": training_config(self.trial_config(base, 0)), "search": search,
                           "trials": self.exp.trials, "seed": self.exp.seeds[0]})
        record = self.out / "stages" / f"tune-{entry.method.name}-{key}.json"
        if record.exists():
            self.chosen[entry.method.name] = json.loads(record.read_text())["config"]
            self.progress.skip(stage.trials, "tune choice already recorded")
            return
        parent = self._parent_run(stage)
        searcher = OptunaSearch(space=optuna_space(search), metric="objective", mode="max",
                                seed=self.exp.seeds[0])
        callback = self._tuner(self.trial_config(base, self.exp.seeds[0]), stage, parent, stage.trials, searcher)
        if not callback.completed:
            raise WbsweepError(f"every trial of stage '{stage.label}' failed; see the errors above and "
                               f"{self.out / 'ray'} for logs.")
        best = max(callback.completed, key=lambda c: c["objective"])
        chosen = {k: v for k, v in training_config(best["config"]).items() if k not in ("seed", "init_from")}
        chosen = {k: chosen[k] for k in base} | {k: chosen[k] for k in search}
        self.chosen[entry.method.name] = chosen
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": chosen, "objective": best["objective"],
                                   "searched": {k: chosen[k] for k in search}}, indent=2, default=str))
        os.replace(tmp, record)
        self.tracker.log_params(parent, {f"best.{k}": chosen[k] for k in search})
        self.tracker.log_metrics(parent, {"best_objective": best["objective"]})
        self.tracker.finish(parent)

    def run_repeat(self, stage: Stage) -> None:
        from ray import tune

        entry = stage.entry
        cfg = self.chosen.get(entry.method.name) or self.base_config(entry)
        self.chosen[entry.method.name] = cfg
        done = self.finished_rows(entry.method.name)
        todo = []
        for seed in self.exp.seeds:
            h = config_hash(training_config(self.trial_config(cfg, seed)))
            if (h, seed) in done:
                self.progress.skip(1, "already in results")
                continue
            metrics = load_metrics(run_dir(self.runs, h, seed))
            if metrics is not None:  # trained before (e.g. the tune stage's own seed): rows only
                self.record(stage, self.trial_config(cfg, seed), metrics, self._run_id_of(h, seed))
                self.progress.skip(1, "trained earlier, rows written")
                continue
            todo.append(seed)
        if not todo:
            return
        parent = self._parent_run(stage)
        space = {**self.trial_config(cfg, todo[0]), "seed": tune.grid_search(todo)}
        callback = self._tuner(space, stage, parent, 1)
        failed = len(todo) - len(callback.completed)
        self.tracker.finish(parent, "FINISHED" if failed == 0 else "FAILED")

    # --- bookkeeping -------------------------------------------------------------------------

    def finished_rows(self, method: str) -> set[tuple[str, int]]:
        df = read_rows(self.out / "results")
        df = df[(df["spec"] == self.exp.name) & (df["method"] == method)]
        return set(zip(df["config_hash"], df["seed"].astype(int), strict=True))

    def _run_id_of(self, hash_: str, seed: int) -> str | None:
        path = run_dir(self.runs, hash_, seed) / "mlflow_run_id"
        return path.read_text().strip() if path.exists() else None

    def record(self, stage: Stage, trial_config: dict[str, Any], metrics: dict[str, Any],
               run_id: str | None) -> None:
        """Write the Parquet rows of one finished model (results for repeat, trials for tune)."""
        cfg = training_config(trial_config)
        rows = rows_for_run(
            metrics, cfg, spec=self.exp.name, preset=self.exp.preset, method=stage.entry.method.name,
            stage=stage.kind, mlflow_run_id=run_id, versions=self.versions,
            created_at=pd.Timestamp.now(tz="UTC").floor("s"),
        )
        folder = "results" if stage.kind == "repeat" else "trials"
        name = f"{self.exp.name}-{stage.entry.method.name}-{metrics['config_hash']}-s{cfg['seed']}"
        write_rows(self.out / folder, name, rows)
