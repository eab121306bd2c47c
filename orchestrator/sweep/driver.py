"""The driver: one experiment (spec, preset, variant) as one Ray Tune experiment.

Per method of the spec:

* ``tune``: OptunaSearch over the knobs the spec searches for this method, objective = validation
  balanced accuracy (the best over the method's LA variants, each with tau/gamma picked on
  validation). There is no tune stage when nothing is searched (the paper preset's fixed λ, ζ).
* ``repeat``: the chosen config for every seed of the preset, evaluated on test.

A WB-style method (``parent`` set) starts from its parent's checkpoint of the same seed. Finished
models are keyed by config hash and seed (``DIR/runs/<hash>/seed<k>``) and never trained twice;
a tune stage whose choice is recorded in ``DIR/stages`` is not searched again; so re-running an
interrupted sweep resumes it.

Read :meth:`Sweep.run` top to bottom: start Ray, open MLflow, build the
:class:`~orchestrator.sweep.context.SweepContext` that every part receives, the stage graph
(:mod:`orchestrator.sweep.graph`: which trial runs next), the listeners (the trial callback, the
stages' MLflow runs, the watchdog), then ``Tuner.fit``. docs/architecture.md shows how data flows.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.record import stores
from orchestrator.record.folder_lock import FolderLock
from orchestrator.record.provenance import versions
from orchestrator.record.records import SweepRecords
from orchestrator.record.results import upgrade_files
from orchestrator.spec import configs
from orchestrator.spec.experiment import Experiment, stages
from orchestrator.sweep.cluster import check_reachable, check_trial_fits, cluster_shape, pending_trials
from orchestrator.sweep.events import EventList, ProgressEvents
from orchestrator.sweep.fusion import FusionSizes, machine_of
from orchestrator.sweep.progress import Progress
from orchestrator.sweep.ray_start import start_ray
from orchestrator.sweep.status import StatusFile
from orchestrator.tracking.tracker import Outbox, Tracker, first_line
from trainables import storage
from trainables.config import DEFAULTS, config_hash, is_number
from trainables.errors import WbsweepError, exception_chain


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
    lock: FolderLock | None = None  # the results folder's lock, held by the command (None: none, as in tests)


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
    """Runs one experiment. Results go to Parquet and MLflow as each trial ends.

    Made, it has checked everything that can be checked before a cluster starts (resources, the
    dataset, the results already there, the stores and servers it will use) and written nothing."""

    def __init__(self, exp: Experiment, opts: SweepOptions):
        self.exp, self.opts = exp, opts
        self.out = opts.out  # this machine's: status, Optuna's study, a local MLflow store
        self.store = opts.storage or str(self.out.resolve())  # every node's: see trainables.storage
        res = exp.resources
        self.cpus = opts.cpus_per_trial if opts.cpus_per_trial is not None else res.get("cpus_per_trial", 1)
        self.gpus = opts.gpus_per_trial if opts.gpus_per_trial is not None else res.get("gpus_per_trial", 0)
        self.max_concurrent = opts.max_concurrent if opts.max_concurrent is not None else res.get("max_concurrent")
        self.max_failures = opts.max_failures if opts.max_failures is not None else res.get("max_failures", 2)
        self.check_resources()
        planned = stages(exp)
        self.progress = Progress(sum(s.trials for s in planned), [s.label for s in planned], quiet=opts.quiet)
        # models per trial: fixed, or measured per fusion key once Ray is up (orchestrator/sweep/fusion.py)
        self.fusion = FusionSizes(opts.fuse if opts.fuse is not None else res.get("fuse", "auto"), self.out,
                                  self.cpus, self.gpus, note=self.progress.note)
        self._optuna_storage = None
        self.preflight()
        self.records = SweepRecords(self.store, exp.name, exp.preset, versions())  # results/ read once, here
        from orchestrator.sweep.watchdog import heartbeat_s

        self.status = StatusFile(self.out, exp, self.store, self.progress, heartbeat_s())
        self.progress.listener = self.status.write

    def machine(self) -> dict[str, Any]:
        """What every training config of this sweep gets beside the spec's: the device, the threads
        (a trial's CPUs), where the data are and which data they are (their fingerprint)."""
        return {"data_fingerprint": self.data_fingerprint, "device": self.opts.device,
                "threads": max(1, int(self.cpus)), "data_root": self.data_root()}

    def data_root(self) -> str | None:
        """Where the trials read the dataset: --data-root, else the spec's ``data_root``, else
        $WBSWEEP_DATA_ROOT, made absolute here (``~`` and relative paths mean what they mean for the
        command, not for a trial, which runs in a folder of its own); None: each node's default."""
        return configs.data_root(self.exp, self.opts.data_root)

    def context(self, tracker: Tracker | None, outbox, autoscaling: bool = False, scheduler=None):
        """The :class:`~orchestrator.sweep.context.SweepContext` of this sweep. ``tracker`` None: no
        MLflow (a graph driven without a cluster, as tests do; ``outbox`` then drops the calls)."""
        from orchestrator.sweep.context import SweepContext

        events = EventList([ProgressEvents(self.progress)])
        return SweepContext(exp=self.exp, out=self.out, records=self.records, machine=self.machine(),
                            cpus=self.cpus, gpus=self.gpus, autoscaling=autoscaling, progress=self.progress,
                            status=self.status, tracker=tracker, outbox=outbox, events=events,
                            optuna_storage=self.optuna_storage, scheduler=scheduler, lock=self.opts.lock)

    # --- running -----------------------------------------------------------------------------

    def run(self) -> None:
        """Run the sweep (:meth:`_run`); a full disk met anywhere on the way, by the trials, the
        driver's writes, a store or Ray Tune's own files, ends it in one line, resumable
        (:mod:`orchestrator.sweep.diskfull`)."""
        from orchestrator.sweep.diskfull import DiskFull, cause_text, disk_full, full_disk

        try:
            self._run()
        except (WbsweepError, KeyboardInterrupt):
            raise  # said in one line already (a DiskFull among them)
        except Exception as exc:
            if disk_full(self.out, exc):
                stop: DiskFull = full_disk(self.out, "the sweep could not write", cause_text(exc))
                self.status.write("stopped", stop.problem)
                raise stop from None
            raise

    def _run(self) -> None:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own progress lines instead of Ray's tables
        import optuna
        import ray
        from ray import tune

        from orchestrator.sweep.callbacks import TrialCallback, close_interrupted_runs
        from orchestrator.sweep.diskfull import DiskFull
        from orchestrator.sweep.graph import StageGraph, prefetch_fusion
        from orchestrator.sweep.scheduler import stage_scheduler
        from orchestrator.sweep.stage_runs import StageRuns
        from orchestrator.sweep.watchdog import SweepStopped, Watchdog
        from trainables.trial import tune_trainable

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Ray Tune logs every crashed trial with a traceback; our callback says it in one line and
        # the traceback stays in the trial's error.txt under DIR/ray. Its one message about trials
        # that cannot start ("insufficient resources") stays audible.
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        logging.getLogger("ray.tune.execution.insufficient_resources_manager").setLevel(logging.WARNING)
        # 1. The cluster: started or joined; the trials must fit it.
        local = start_ray(self.opts.address, self.opts.quiet)  # one line for what stops Ray
        # SIGTERM (kill, a scheduler's stop) as Ctrl-C: Ray Tune stops its trials gracefully and the
        # status says interrupted. Set after ray.init, whose libraries install an aborting handler.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
        shape = cluster_shape(local)
        check_trial_fits(shape, self.cpus, self.gpus, local)
        self.fusion.start(machine_of(ray.nodes()) if local else None)
        prefetch_fusion(self.exp, self.machine(), self.fusion)  # fuse auto: measured while MLflow and Tune start
        self.note_stale_results()  # once nothing can refuse the sweep any more: errors stay one line
        self.upgrade_old_files()
        # 2. MLflow: a local store keeps artifacts beside the results; a tracking server decides where
        # they go (its --artifacts-destination), so that every node can upload them over HTTP.
        tracking_local = not self.opts.tracking_uri.startswith(("http://", "https://"))
        tracker = Tracker(self.opts.tracking_uri, self.exp.name, self.out / "mlartifacts" if tracking_local else None)
        for note in tracker.notes:
            self.progress.note(note, always=True)
        close_interrupted_runs(tracker, self.records)
        outbox = Outbox(self.progress.note)  # the tracking calls of the listeners: never stop the sweep
        # 3. What every part shares, the stage graph and the listeners.
        ctx = self.context(tracker, outbox, shape.autoscaling, stage_scheduler(self.exp))
        graph = StageGraph(ctx, self.fusion)
        stage_runs = StageRuns(ctx)
        ctx.events.add(stage_runs)
        callback = TrialCallback(ctx, graph, stage_runs)
        self.progress.begin()
        if shape.autoscaling:
            self.progress.note(f"autoscaling cluster ({shape.source}): node types {shape.describe()}; "
                               "trials wait while the autoscaler starts the nodes they need")
        # 4. One Ray Tune experiment for the whole sweep.
        tuner = tune.Tuner(
            tune.with_resources(tune_trainable, {"cpu": self.cpus, "gpu": self.gpus}),
            param_space={"_runs": ctx.runs},
            tune_config=tune.TuneConfig(
                metric="objective", mode="max", num_samples=-1, search_alg=graph, scheduler=ctx.scheduler,
                max_concurrent_trials=self.max_concurrent, reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"{self.exp.name}-{self.exp.preset}", **self.ray_storage(),
                callbacks=[callback, Watchdog(ctx)], verbose=0,
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
            ),
        )
        self.status.write("running")
        outcome, reason, stopped_because = "failed", "", None
        try:
            with pending_limit(pending_trials(shape, self.cpus, self.gpus, self.max_concurrent)):
                tuner.fit()
            if graph.error is not None:
                raise graph.error
            graph.advance()  # stages finished by the last trial
            if any(n.state in ("waiting", "running") for n in graph.nodes):
                # Ray Tune stops gracefully on Ctrl-C/SIGTERM and returns: this sweep is not done.
                raise KeyboardInterrupt
            outcome = "failed" if self.progress.failures else "finished"
        except KeyboardInterrupt:
            outcome, reason = "interrupted", "interrupted: the sweep was stopped (Ctrl-C or SIGTERM)"
            raise
        except BaseException as exc:
            chain = list(exception_chain(exc))  # Ray Tune's TuneError wraps a callback's (the watchdog's, a DiskFull)
            cause = next((e for e in chain if isinstance(e, SweepStopped)), chain[-1])
            if isinstance(cause, SweepStopped):  # the watchdog: its one line, its exit status
                outcome, stopped_because = "stopped", cause.problem
                reason = f"stopped{'' if isinstance(cause, DiskFull) else ' by the watchdog'}: {cause.problem}"
                raise cause from None
            reason = f"the sweep stopped on an error: {first_line(cause)}"
            raise
        finally:
            self.status.state = outcome
            try:
                # End what this run started, on every way out of it: the MLflow runs of the trials it
                # stopped (KILLED when interrupted or stopped by the watchdog, FAILED on an error, with
                # the reason in ``wbsweep.error``), the runs of the stages not done, the Optuna trials in
                # flight (FAIL, as a resume would end them); then the tracking calls still deferred are
                # made, or said to be missing. No trial counts as running or pending any more.
                if reason:
                    status = "KILLED" if outcome in ("interrupted", "stopped") else "FAILED"
                    callback.close(status, reason)
                    graph.stop(status, reason)
                stage_runs.log_summaries(list(graph.repeats.values()))  # mean and std over each repeat's seeds
                outbox.catch_up(final=True)
                self.progress.stopped()
                self.progress.finish()
            finally:
                self.status.write(outcome, stopped_because)

    # --- before anything runs ------------------------------------------------------------------

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
        readable), the cluster and tracking server answer (the results already there are read next,
        by :class:`~orchestrator.record.records.SweepRecords`)."""
        from trainables.datacache import dataset_fingerprint

        train = {**DEFAULTS, **self.exp.train}
        # What the models are tied to: trained on other data (another --data-root, the real files
        # after a fake set), a model has another config hash and is never reused.
        self.data_fingerprint = dataset_fingerprint(train["dataset"], self.data_root(), train["rho"],
                                                    train["val_per_class"], train["split"])
        if storage.is_remote(self.store):
            storage.check_writable(self.store)
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
        df = self.records.at_start
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
        n = sum(upgrade_files(self.records.location(folder)) for folder in ("results", "trials"))
        if n:
            self.progress.note(f"upgraded {n} Parquet file(s) written by an earlier version to today's columns "
                               "(the new columns are empty there).", always=True)

    def optuna_storage(self):
        """One RDB storage (SQLite beside the results) for every tune stage's study."""
        if self._optuna_storage is None:
            self._optuna_storage, note = stores.open_optuna_storage(self.out / "optuna.db")
            if note:
                self.progress.note(note, always=True)
        return self._optuna_storage

    def ray_storage(self) -> dict[str, Any]:
        """Ray Tune's storage arguments: DIR/ray beside the results, on the same filesystem."""
        if not storage.is_remote(self.store):
            return {"storage_path": str(Path(self.store) / "ray")}
        fs, path = storage.filesystem(self.records.location("ray"))
        return {"storage_path": path, "storage_filesystem": fs}
