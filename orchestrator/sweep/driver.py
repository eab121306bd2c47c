"""Expand an experiment into its stage graph and run it as one Ray Tune experiment.

Per method of the spec:

* ``tune``: OptunaSearch over the knobs the spec searches for this method, objective = validation
  balanced accuracy (the best over the method's LA variants, each with tau/gamma picked on
  validation). There is no tune stage when nothing is searched (the paper preset's fixed λ, ζ).
* ``repeat``: the chosen config for every seed of the preset, evaluated on test.

A WB-style method (``parent`` set) starts from its parent's checkpoint of the same seed. Finished
models are keyed by config hash and seed (``DIR/runs/<hash>/seed<k>``) and never trained twice;
a tune stage whose choice is recorded in ``DIR/stages`` is not searched again; so re-running an
interrupted sweep resumes it. How the stages are scheduled is in :mod:`orchestrator.sweep.graph`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.record import stores
from orchestrator.record.results import read_rows, rows_for_run, upgrade_files, write_rows
from orchestrator.spec import early_stopping as early_stop
from orchestrator.spec.experiment import Experiment, MethodEntry
from orchestrator.sweep.cluster import check_reachable, check_trial_fits, cluster_shape, pending_trials
from orchestrator.sweep.fusion import FusionSizes, machine_of
from orchestrator.sweep.graph import Node, RepeatNode, StageGraph, TuneNode
from orchestrator.sweep.progress import Progress
from orchestrator.sweep.ray_start import start_ray
from orchestrator.sweep.stage_runs import log_repeat_summaries, reference_run
from orchestrator.tracking.tracker import Outbox, Tracker, first_line
from trainables import storage
from trainables.config import DEFAULTS, config_hash, is_number
from trainables.errors import WbsweepError, exception_chain
from trainables.fused import fusion_key
from trainables.methods import method_config
from trainables.readers import DATA_ROOT_ENV, default_data_root
from trainables.storage import run_location
from trainables.trial import finished_metrics, training_config, tune_trainable


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
    storage: str | None = None  # results, runs and Ray's state: a shared folder or s3://...; default out
    data_root: str | None = None
    address: str | None = None
    device: str = "auto"
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    max_failures: int | None = None  # retries of a crashed trial (from its checkpoint); spec default 2
    fuse: str | int | None = None  # models per trial (fused training): "auto", "off" or K; spec default auto
    quiet: bool = False


def plan(exp: Experiment) -> list[Stage]:
    """The stages of ``exp``: per method a tune stage (when it searches anything) and a repeat."""
    stages: list[Stage] = []
    for entry in exp.methods:
        if exp.searched_for(entry.method) and exp.trials > 0:
            stages.append(Stage("tune", entry, exp.trials))
        stages.append(Stage("repeat", entry, len(exp.seeds)))
    return stages


def versions() -> dict[str, str]:
    """The code and package versions every row records (orchestrator/record/provenance.py)."""
    from orchestrator.record.provenance import versions as provenance

    return provenance()


@contextmanager
def pending_limit(n: int) -> Iterator[None]:
    """Ray Tune keeps up to ``n`` trials PENDING while this context is open.

    Tune reads the number from ``TUNE_MAX_PENDING_TRIALS_PG`` when it starts an experiment (for a
    custom searcher it is otherwise 1, or the ``max_concurrent_trials`` cap, which would also fix the
    number of trials in flight for the whole sweep). Pending trials are what the autoscaler scales
    for; the number running is left to Tune and the cluster (see :func:`orchestrator.sweep.cluster.pending_trials`)."""
    key = "TUNE_MAX_PENDING_TRIALS_PG"
    saved = os.environ.get(key)
    os.environ[key] = str(int(n))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


class Sweep:
    """Runs one experiment. Results go to Parquet and MLflow as each trial ends."""

    def __init__(self, exp: Experiment, opts: SweepOptions):
        self.exp, self.opts = exp, opts
        self.out = opts.out  # this machine's: status, Optuna's study, a local MLflow store
        self.store = opts.storage or str(self.out.resolve())  # every node's: see trainables.storage
        self.runs = storage.join(self.store, "runs")
        self.chosen: dict[str, dict[str, Any]] = {}  # method -> training config (without seed)
        self.versions = versions()
        self._optuna_storage = None
        res = exp.resources
        self.cpus = opts.cpus_per_trial if opts.cpus_per_trial is not None else res.get("cpus_per_trial", 1)
        self.gpus = opts.gpus_per_trial if opts.gpus_per_trial is not None else res.get("gpus_per_trial", 0)
        self.max_concurrent = opts.max_concurrent if opts.max_concurrent is not None else res.get("max_concurrent")
        self.max_failures = opts.max_failures if opts.max_failures is not None else res.get("max_failures", 2)
        # models per trial: fixed, or measured per fusion key once Ray is up (orchestrator/sweep/fusion.py)
        self.fusion = FusionSizes(opts.fuse if opts.fuse is not None else res.get("fuse", "auto"), self.out,
                                  self.cpus, self.gpus, note=lambda line: self.progress.note(line))
        self.check_resources()
        stages = plan(exp)
        self.progress = Progress(sum(s.trials for s in stages), len(stages), quiet=opts.quiet)
        self.preflight()
        self.tracker: Tracker  # opened in run(), once the cluster is known to fit the trials
        self.nodes: list[Node] = []
        self.repeat_nodes: dict[str, RepeatNode] = {}
        tune_nodes: dict[str, TuneNode] = {}
        for s in stages:
            if s.kind == "tune":
                tune_nodes[s.entry.method.name] = TuneNode(self, s.entry, s.trials)
                self.nodes.append(tune_nodes[s.entry.method.name])
            else:
                node = RepeatNode(self, s.entry, s.trials, tune_nodes.get(s.entry.method.name))
                self.repeat_nodes[s.entry.method.name] = node
                self.nodes.append(node)
        self.graph = StageGraph(self.nodes, self.fusion)
        self.state = "running"  # in the status file: running -> finished | failed | interrupted
        self.status_error = False  # a status file that could not be written has been reported
        self.progress.listener = lambda: self.status(self.state)

    # --- configs ---------------------------------------------------------------------------

    def base_config(self, entry: MethodEntry) -> dict[str, Any] | str | None:
        """The training config of a method before any search: the spec's train options + the
        method's knobs with the preset's fixed hyperparameters. For a second-stage method, its
        parent's chosen config: None while that is not chosen yet, a reason if it never will be."""
        method = entry.method
        cfg: dict[str, Any] = dict(self.exp.train)
        if method.parent:
            parent = self.chosen.get(method.parent)
            if parent is None:
                node = self.repeat_nodes[method.parent]
                failed = node.state == "failed" or (node.tune is not None and node.tune.state == "failed")
                return f"its first stage '{method.parent}' failed" if failed else None
            cfg = dict(parent)
            cfg["parent_hash"] = config_hash(training_config(self.trial_config(cfg, 0)))
        cfg.update(method_config(method, self.exp.hyper))
        cfg["la"] = list(entry.la)
        cfg["data_fingerprint"] = self.data_fingerprint
        cfg["device"] = self.opts.device
        cfg["threads"] = max(1, int(self.cpus))
        cfg["data_root"] = self.data_root()
        return cfg

    def data_root(self) -> str | None:
        """Where the trials read the dataset: --data-root, else the spec's ``data_root``, else
        $WBSWEEP_DATA_ROOT, made absolute here (``~`` and relative paths mean what they mean for the
        command, not for a trial, which runs in a folder of its own); None: each node's default."""
        root = self.opts.data_root or self.exp.train.get("data_root")
        if root:
            return str(Path(root).expanduser().resolve())
        return str(default_data_root()) if os.environ.get(DATA_ROOT_ENV, "").strip() else None

    def fusion_key(self, cfg: dict[str, Any], varies: tuple[str, ...] = ()) -> tuple[str, ...] | None:
        """The fusion key of a stage's models (:func:`trainables.fused.fusion_key`), or None when this
        sweep trains them one per trial (``fuse: off``, or a model that cannot be fused)."""
        return fusion_key(cfg, varies) if self.fusion.fuses else None

    def prefetch_fusion(self) -> None:
        """``fuse: auto``: start measuring the models of the stages whose configs are known at the start
        (every first stage), so the measurement runs while MLflow and Ray Tune start."""
        if not self.fusion.auto:
            return
        for node in self.nodes:
            cfg = self.base_config(node.entry)
            if isinstance(cfg, dict) and self.fusion_key(cfg, tuple(self.exp.searched_for(node.entry.method))):
                self.fusion.prefetch(cfg)

    def trial_config(self, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
        return {**cfg, "seed": seed, "_runs": self.runs}

    def parent_model_state(self, entry: MethodEntry, seed: int) -> str:
        """'done' when the method needs no parent model or the parent's model of ``seed`` exists."""
        if not entry.method.parent:
            return "done"
        return self.repeat_nodes[entry.method.parent].model_state(seed)

    # --- running -----------------------------------------------------------------------------

    def run(self) -> None:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own progress lines instead of Ray's tables
        import optuna
        import ray
        from ray import tune

        from orchestrator.sweep.callbacks import TrialCallback, close_interrupted_runs
        from orchestrator.sweep.watchdog import SweepStopped, Watchdog

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Ray Tune logs every crashed trial with a traceback; our callback says it in one line and
        # the traceback stays in the trial's error.txt under DIR/ray. Its one message about trials
        # that cannot start ("insufficient resources") stays audible.
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        logging.getLogger("ray.tune.execution.insufficient_resources_manager").setLevel(logging.WARNING)
        local = start_ray(self.opts.address, self.opts.quiet)  # one line for what stops Ray
        # SIGTERM (kill, a scheduler's stop) as Ctrl-C: Ray Tune stops its trials gracefully and the
        # status says interrupted. Set after ray.init, whose libraries install an aborting handler.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
        self.shape = cluster_shape(local)
        check_trial_fits(self.shape, self.cpus, self.gpus, local)
        self.fusion.start(machine_of(ray.nodes()) if local else None)
        self.prefetch_fusion()
        self.note_stale_results()  # once nothing can refuse the sweep any more: errors stay one line
        self.upgrade_old_files()
        # A local store keeps artifacts beside the results; a tracking server decides where they go
        # (its --artifacts-destination), so that every node can upload them over HTTP.
        tracking_local = not self.opts.tracking_uri.startswith(("http://", "https://"))
        self.tracker = Tracker(self.opts.tracking_uri, self.exp.name,
                               self.out / "mlartifacts" if tracking_local else None)
        for note in self.tracker.notes:
            self.progress.note(note, always=True)
        close_interrupted_runs(self.tracker, self.runs)
        self.outbox = Outbox(self.progress.note)  # the tracking calls of the callbacks: never stop the sweep
        self.progress.begin()
        if self.shape.autoscaling:
            self.progress.note(f"autoscaling cluster ({self.shape.source}): node types {self.shape.describe()}; "
                               "trials wait while the autoscaler starts the nodes they need")
        self.callback = TrialCallback(self)
        self.scheduler = early_stop.stage_scheduler(self.exp)  # ASHA for tune stages, or None (FIFO)
        tuner = tune.Tuner(
            tune.with_resources(tune_trainable, {"cpu": self.cpus, "gpu": self.gpus}),
            param_space={"_runs": self.runs},
            tune_config=tune.TuneConfig(
                metric="objective", mode="max", num_samples=-1, search_alg=self.graph, scheduler=self.scheduler,
                max_concurrent_trials=self.max_concurrent, reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"{self.exp.name}-{self.exp.preset}", **self.ray_storage(),
                callbacks=[self.callback, Watchdog(self)], verbose=0,
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
            ),
        )
        self.status("running")
        outcome, reason, stopped_because = "failed", "", None
        try:
            with pending_limit(pending_trials(self.shape, self.cpus, self.gpus, self.max_concurrent)):
                tuner.fit()
            if self.graph.error is not None:
                raise self.graph.error
            self.graph.advance()  # stages finished by the last trial
            if any(n.state in ("waiting", "running") for n in self.nodes):
                # Ray Tune stops gracefully on Ctrl-C/SIGTERM and returns: this sweep is not done.
                raise KeyboardInterrupt
            outcome = "failed" if self.progress.failures else "finished"
        except KeyboardInterrupt:
            outcome, reason = "interrupted", "interrupted: the sweep was stopped (Ctrl-C or SIGTERM)"
            raise
        except BaseException as exc:
            cause = list(exception_chain(exc))[-1]  # the innermost: Ray Tune's TuneError wraps a callback's
            if isinstance(cause, SweepStopped):  # the watchdog: its one line, its exit status
                outcome, stopped_because = "stopped", cause.problem
                reason = f"stopped by the watchdog: {cause.problem}"
                raise cause from None
            reason = f"the sweep stopped on an error: {first_line(cause)}"
            raise
        finally:
            self.state = outcome
            try:
                self.close(outcome, reason)
            finally:
                self.status(outcome, stopped_because)

    def close(self, outcome: str, reason: str) -> None:
        """End what this run started, on every way out of it: the MLflow runs of the trials it
        stopped (KILLED when interrupted or stopped by the watchdog, FAILED on an error, with the
        reason in ``wbsweep.error``), the runs of the stages not done, the Optuna trials in flight
        (FAIL, as a resume would end them); then the tracking calls still deferred are made, or said
        to be missing. No trial counts as running or pending any more."""
        status = "KILLED" if outcome in ("interrupted", "stopped") else "FAILED"
        if reason:
            self.callback.close(status, reason)
            for node in self.nodes:
                try:
                    node.stop(status, reason)
                except Exception as exc:  # the Optuna store: the next run ends these trials instead
                    self.progress.note(f"WARNING {node.label}: could not end its Optuna trials ({first_line(exc)}); "
                                       "the next run of this command does")
        log_repeat_summaries(self)  # each finished repeat parent: mean and std over its seeds
        self.outbox.catch_up(final=True)
        self.progress.stopped()
        self.progress.finish()

    def check_resources(self) -> None:
        """The per-trial resources (flags or the spec's ``resources``) are numbers Ray accepts."""
        if not is_number(self.cpus) or self.cpus <= 0:
            raise WbsweepError(f"cpus_per_trial must be a number above 0, got {self.cpus!r}.")
        if not is_number(self.gpus) or self.gpus < 0:
            raise WbsweepError(f"gpus_per_trial must be a number from 0 (e.g. 1 or 0.25), got {self.gpus!r}.")
        if self.max_concurrent is not None and (not is_number(self.max_concurrent) or self.max_concurrent < 1
                                                or self.max_concurrent != int(self.max_concurrent)):
            raise WbsweepError(f"max_concurrent must be a whole number from 1, got {self.max_concurrent!r}.")
        if not is_number(self.max_failures) or self.max_failures < -1 or self.max_failures != int(self.max_failures):
            raise WbsweepError(f"max_failures must be a whole number from 0 (-1: retry for ever), "
                               f"got {self.max_failures!r}.")

    def preflight(self) -> None:
        """Check what would otherwise fail later (inside every trial, or after hours), before any
        cluster time is spent and before anything is written: the dataset loads (files present and
        readable), the results already there are readable, the cluster and tracking server answer."""
        from trainables.datacache import dataset_fingerprint

        train = {**DEFAULTS, **self.exp.train}
        # What the models are tied to: trained on other data (another --data-root, the real files
        # after a fake set), a model has another config hash and is never reused.
        self.data_fingerprint = dataset_fingerprint(train["dataset"], self.data_root(), train["rho"],
                                                    train["val_per_class"], train["split"])
        if storage.is_remote(self.store):
            storage.check_writable(self.store)
        self.results_at_start = read_rows(self.location("results"))  # readable, and note_stale_results reads it
        if (self.out / "optuna.db").exists():
            self.optuna_storage()
        if self.opts.address not in (None, "auto", "local"):
            check_reachable(self.opts.address, "the Ray cluster (--address)")
        if self.opts.tracking_uri.startswith(("http://", "https://")):
            check_reachable(self.opts.tracking_uri, "the MLflow tracking server (--tracking-uri)")

    def note_stale_results(self) -> None:
        """One line when this spec and preset have rows of models that will not be reused: trained on
        other data (another data fingerprint, or none: an earlier version) or under an earlier
        protocol (their config hashes differently today, e.g. a model's initialisation changed).
        Their rows stay in results/; the models are trained again the current way."""
        df = self.results_at_start
        df = df[(df["spec"] == self.exp.name) & (df["preset"] == self.exp.preset)]
        if self.exp.variant is not None:
            df = df[(df["dataset"] == self.exp.train.get("dataset")) & (df["model"] == self.exp.train.get("model"))]
        other_data, old_protocol = set(), set()
        for row in df.drop_duplicates(["config_hash", "seed"]).itertuples():
            model = (row.config_hash, row.seed)
            if row.data_fingerprint != self.data_fingerprint:
                other_data.add(model)
            elif config_hash(json.loads(row.config)) != row.config_hash:
                old_protocol.add(model)
        if other_data or old_protocol:
            what = [f"{len(other_data)} on other data (or before fingerprints were recorded)"] if other_data else []
            what += [f"{len(old_protocol)} under an earlier protocol (e.g. the initialisation)"] if old_protocol else []
            self.progress.note(f"results/ holds {self.exp.name}/{self.exp.preset} models trained {' and '.join(what)}: "
                               "they are not reused and are trained again now; their rows stay readable.", always=True)

    def upgrade_old_files(self) -> None:
        """Result and trial files written by an earlier version get the columns added since (as
        nulls), so that ``pandas.read_parquet`` of the folder sees every column (see
        :func:`orchestrator.record.results.upgrade_files`)."""
        n = sum(upgrade_files(self.location(folder)) for folder in ("results", "trials"))
        if n:
            self.progress.note(f"upgraded {n} Parquet file(s) written by an earlier version to today's columns "
                               "(the new columns are empty there).", always=True)

    def status(self, state: str, reason: str | None = None) -> None:
        """DIR/status/<spec>-<preset>.json: what `wbsweep status` shows (written atomically). While
        the sweep runs, its watchdog rewrites it every ``heartbeat_s`` (orchestrator.sweep.watchdog)."""
        from orchestrator.sweep.watchdog import heartbeat_s

        folder = self.out / "status"
        p = self.progress
        doc = {
            "spec": self.exp.name, "preset": self.exp.preset, "variant": self.exp.variant, "state": state,
            "dataset": self.exp.train.get("dataset", DEFAULTS["dataset"]),
            "model": self.exp.train.get("model", DEFAULTS["model"]),
            "pid": os.getpid(), "out": str(self.out.resolve()),
            # none when the results are in --out, so a folder moved or copied later reads its own
            "storage": None if self.store == str(self.out.resolve()) else self.store,
            "host": socket.gethostname(), "updated": time.time(), "started": p.start,
            # no trial runs or waits once the driver has stopped
            "trials": {"total": p.total, "done": p.finished, "skipped": p.skipped,
                       "running": p.running if state == "running" else 0,
                       "failed": p.n_failed, "pending": p.pending if state == "running" else 0},
            "waiting_since": p.waiting_since if state == "running" else None,
            "stages": {n.label: n.state for n in self.nodes}, "failures": p.failures,
            "heartbeat_s": heartbeat_s(), "reason": reason,
        }
        variant = f"-{self.exp.variant}" if self.exp.variant is not None else ""
        path = folder / f"{self.exp.name}-{self.exp.preset}{variant}.json"
        tmp = path.with_suffix(".tmp")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, indent=2))
            os.replace(tmp, path)
            self.status_error = False
        except OSError as exc:  # a full disk, a folder made read-only: `wbsweep status` lags, the sweep goes on
            if not self.status_error:
                self.status_error = True
                self.progress.note(f"WARNING cannot write the status file {path}: {exc}; `wbsweep status` "
                                   "shows an older state until it can")

    def optuna_storage(self):
        """One RDB storage (SQLite beside the results) for every tune stage's study."""
        if self._optuna_storage is None:
            self._optuna_storage, note = stores.open_optuna_storage(self.out / "optuna.db")
            if note:
                self.progress.note(note, always=True)
        return self._optuna_storage

    # --- bookkeeping -------------------------------------------------------------------------

    def unfinished_seeds(self, node: RepeatNode, cfg: dict[str, Any]) -> list[int]:
        """Seeds of ``node`` still to train. Seeds with rows are skipped; models trained earlier
        (the tune stage's own seed, another spec's identical run) only get their rows written."""
        df = read_rows(self.location("results"))
        # this preset's rows only: another preset of the same config gets its own rows (report reads one preset)
        df = df[(df["spec"] == self.exp.name) & (df["preset"] == self.exp.preset) & (df["method"] == node.method)]
        done = set(zip(df["config_hash"], df["seed"].astype(int), strict=True))
        todo = []
        for seed in self.exp.seeds:
            h = config_hash(training_config(self.trial_config(cfg, seed)))
            if (h, seed) in done:
                self.progress.skip(1, "rows")
                continue
            metrics = finished_metrics(self.runs, h, seed)
            if metrics is not None:
                metrics["ray_node_id"] = self.run_file(h, seed, "ray_node_id")
                source = self.run_file(h, seed, "mlflow_run_id")
                self.record(node, self.trial_config(cfg, seed), metrics, source)
                reference_run(self, node, self.trial_config(cfg, seed), metrics, source)  # listed under this stage
                self.progress.skip(1, "model")
                continue
            todo.append(seed)
        return todo

    def location(self, *parts: str) -> str:
        """A location under the sweep's storage (``results``, ``trials``, ``analyses``, ...)."""
        return storage.join(self.store, *parts)

    def run_file(self, hash_: str, seed: int, name: str) -> str | None:
        """A small text file of a model's run folder (``mlflow_run_id``, ``ray_node_id``), or None."""
        data = storage.read_bytes(storage.join(run_location(self.runs, hash_, seed), name))
        return data.decode().strip() if data is not None else None

    def ray_storage(self) -> dict[str, Any]:
        """Ray Tune's storage arguments: DIR/ray beside the results, on the same filesystem."""
        if not storage.is_remote(self.store):
            return {"storage_path": str(Path(self.store) / "ray")}
        fs, path = storage.filesystem(self.location("ray"))
        return {"storage_path": path, "storage_filesystem": fs}

    def record(self, node: Node, trial_config: dict[str, Any], metrics: dict[str, Any], run_id: str | None) -> None:
        """Write the Parquet rows of one finished model (results for repeat, trials for tune)."""
        cfg = training_config(trial_config)
        rows = rows_for_run(
            metrics, cfg, spec=self.exp.name, preset=self.exp.preset, method=node.method,
            stage=node.kind, mlflow_run_id=run_id, versions=self.versions,
            created_at=pd.Timestamp.now(tz="UTC").floor("s"),
        )
        folder = "results" if node.kind == "repeat" else "trials"
        # one file per spec, preset, method, model: another preset reusing the model writes its own file
        name = f"{self.exp.name}-{self.exp.preset}-{node.method}-{metrics['config_hash']}-s{cfg['seed']}"
        write_rows(self.location(folder), name, rows)
