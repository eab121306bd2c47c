"""The Ray Tune callback that turns trial events into MLflow runs, Parquet rows and progress.

It runs in the driver: one child run per trained model (re-attached by its config hash and seed
when the model was trained before), per-epoch metrics as they are reported, and, when a trial
ends, its final metrics, its artifacts (config, checkpoint, logits) and its Parquet rows. Warnings
a trial reports (``warnings`` in a result) are printed and kept in its run's ``wbsweep.warnings``
tag; trials that wait for resources are counted after every step of Tune's loop.

It receives the sweep's :class:`~orchestrator.sweep.context.SweepContext` (never the driver) and the
graph, which tells it the stage of a trial's config. Every MLflow call goes through the context's
:class:`~orchestrator.tracking.tracker.Outbox`: a tracking store
that is locked or unreachable for a while delays the logging, never the sweep. When the sweep
stops (Ctrl-C, SIGTERM, an error), :meth:`TrialCallback.close` ends the runs of the trials it
stopped.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from orchestrator.environment import env_seconds
from orchestrator.record.analyses import record_run_analyses
from orchestrator.record.records import SweepRecords
from orchestrator.sweep.cluster import autoscaler_activity, free_resources
from orchestrator.sweep.context import SweepContext
from orchestrator.sweep.diskfull import cause_text, disk_full, full_disk
from orchestrator.sweep.graph import StageGraph, member_id, trial_members
from orchestrator.sweep.stage_runs import StageRuns, end_reference_runs
from orchestrator.tracking.pytorch_model import log_pytorch_model
from orchestrator.tracking.tracker import Tracker, display_value, final_metrics, flat_params
from trainables import storage
from trainables.config import config_hash
from trainables.reports import WARNINGS, epoch_rows, model_outcomes
from trainables.trial import training_config


def knob_text(value: Any) -> str:
    """A searched knob's value as a run name shows it: numbers to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def close_interrupted_runs(tracker: Tracker, records: SweepRecords) -> None:
    """End the model runs a dead driver (kill -9, a lost head node) left RUNNING: FINISHED with
    their metrics and files when the model did finish (its trial ended after the driver died), else
    KILLED with the reason (a tune trial in flight that the resumed study may never propose again).
    A model trained later re-attaches to its run, which then ends FINISHED. Reference runs
    (orchestrator/sweep/stage_runs.py) cut off while being made end FINISHED: they train nothing."""
    end_reference_runs(tracker)
    for run_id, hash_, seed in tracker.running_model_runs():
        metrics = records.finished(hash_, seed)
        if metrics is None:
            tracker.finish(run_id, "KILLED", "interrupted: the driver stopped first")
            continue
        tracker.log_metrics(run_id, final_metrics(metrics), step=int(metrics["epochs"]))
        with storage.local_copy(records.runs, hash_, seed) as folder:
            tracker.log_artifacts(run_id, folder)
        tracker.finish(run_id)


class TrialCallback(Callback):
    # A "waiting for resources" line once trials have waited this long, then at most every WAIT_REPEAT.
    WAIT_NOTE_S = env_seconds("WBSWEEP_WAIT_NOTE_S", 30.0)
    WAIT_REPEAT_S = env_seconds("WBSWEEP_WAIT_REPEAT_S", 300.0)

    def __init__(self, ctx: SweepContext, graph: StageGraph, stage_runs: StageRuns):
        self.ctx, self.graph, self.stage_runs = ctx, graph, stage_runs
        self.tracker: Tracker = ctx.tracker  # type: ignore[assignment]
        # Keyed by member id (orchestrator.sweep.graph.member_id): a trial's own id, or one per model of a fused group.
        self.run_ids: dict[str, str] = {}  # member id -> its MLflow run (set once the run exists)
        # member id -> the run of the model another spec trained, which this trial only re-reports
        self.sources: dict[str, str] = {}
        self.open: set[str] = set()  # models started and not yet ended
        self.logged_epochs: dict[str, set[int]] = {}  # member id -> epochs logged live
        self.pending_since: dict[str, float] = {}  # trial id -> when it was first seen PENDING (monotonic)
        self.next_wait_note: float | None = None
        self.warnings: dict[str, list[str]] = {}  # trial id -> warnings it reported
        self.disk_full: Exception | None = None  # the full disk that stopped the sweep (said once)

    def on_step_end(self, iteration, trials, **info):
        """Trials that wait for resources: counted on the progress line; a line about them once they
        have waited WAIT_NOTE_S (on a fixed cluster only when nothing runs, since there a trial
        waiting for a running one to finish is the normal case). Tracking calls deferred earlier are
        tried again here (at most every ``Outbox.retry_s``)."""
        self.ctx.outbox.catch_up()
        now = time.monotonic()  # waits are durations: a step of the wall clock changes none of them
        pending = {t.trial_id for t in trials if t.status == "PENDING"}
        self.pending_since = {k: self.pending_since.get(k, now) for k in pending}
        since = min(self.pending_since.values()) if pending else None
        progress = self.ctx.progress
        progress.set_pending(len(pending), since)
        if not pending:
            self.next_wait_note = None
            return
        if self.next_wait_note is None:
            self.next_wait_note = since + self.WAIT_NOTE_S
        stuck = self.ctx.autoscaling or not any(t.status == "RUNNING" for t in trials)
        if now >= self.next_wait_note and stuck:
            self.next_wait_note = now + max(self.WAIT_REPEAT_S, self.WAIT_NOTE_S)
            progress.waiting(self.wait_detail())

    def wait_detail(self) -> str:
        """What a waiting trial needs, what is free, what the autoscaler does."""
        ctx = self.ctx
        free = free_resources()
        need = f"each needs {ctx.cpus:g} CPU" + (f" + {ctx.gpus:g} GPU" if ctx.gpus else "")
        text = f"{need}; free now {free['CPU']:g} CPU, {free['GPU']:g} GPU"
        if ctx.autoscaling:
            doing = autoscaler_activity()
            text += f"; autoscaler: {doing or 'asked for nodes (`ray status` shows its progress)'}"
        else:
            text += "; no autoscaler: they start when running trials end or a node that fits joins"
        return text

    def members(self, trial) -> list[tuple[str, dict[str, Any]]]:
        """(member id, trial config) of each model the trial trains (one, or a fused group's)."""
        return trial_members(trial.trial_id, trial.config)

    def label(self, config: dict[str, Any]) -> str:
        return f"{self.graph.node_of(config).label} seed {config['seed']}"

    def note_warnings(self, trial, text: str) -> None:
        """Print a trial's new warnings and keep all of them in its MLflow runs' wbsweep.warnings tag
        (every model's of a fused group: they share the process that raised them)."""
        new = [w for w in text.splitlines() if w.strip()]
        if not new:
            return
        seen = self.warnings.setdefault(trial.trial_id, [])
        seen += new
        members = self.members(trial)
        label = self.label(members[0][1]) + (f" (+{len(members) - 1} fused)" if len(members) > 1 else "")
        for w in new:
            self.ctx.progress.note(f"WARNING {label}: {w}")
        tag = "\n".join(seen)[-5000:]
        for mid, _ in members:
            self.for_run(mid, "a warnings tag",
                         lambda run_id: self.tracker.client.set_tag(run_id, "wbsweep.warnings", tag))

    def for_run(self, mid: str, what: str, call) -> None:
        """``call(run_id)`` on the MLflow run of model ``mid`` (a member id: :func:`member_id`), through
        the outbox: now, or after the calls deferred before it (which may be the one that creates the run)."""
        def on_run() -> None:
            run_id = self.run_ids.get(mid)
            if run_id is not None:  # None: its creation failed for good (said in a warning)
                call(run_id)

        self.ctx.outbox(what, on_run)

    def on_trial_start(self, iteration, trials, trial, **info):
        members = self.members(trial)
        for mid, config in members:
            self.start_run(mid, trial.trial_id if len(members) > 1 else None, config)

    def start_run(self, mid: str, fused_trial: str | None, config: dict[str, Any]) -> None:
        """The MLflow run of model ``mid`` (of the fused group trial ``fused_trial``), made or re-attached."""
        node = self.graph.node_of(config)
        cfg = training_config(config)
        hash_ = config_hash(cfg)
        tags = {"wbsweep.config_hash": hash_, "wbsweep.seed": str(cfg["seed"])}
        name = f"{node.method} seed{cfg['seed']}"
        if node.kind == "tune":  # the trial's searched knobs tell its run apart from the others' in the UI
            name = f"{node.method} " + " ".join(f"{k}={knob_text(cfg[k])}" for k in node.search) + f" seed{cfg['seed']}"
        tracker, records = self.tracker, self.ctx.records
        if node.kind == "tune":  # the Optuna trial names its model (optuna-dashboard shows it)
            node.set_trial_attrs(mid, {"config_hash": hash_})
        # A model finished earlier (this trial only re-reports it: another spec's search proposed it
        # again) whose run is in another spec's experiment gets a reference run here, not a second run.
        finished = records.finished(hash_, cfg["seed"])
        source = records.run_file(hash_, cfg["seed"], "mlflow_run_id") if finished is not None else None

        def start() -> None:  # each step is idempotent: a retry after a partial failure re-attaches
            if source is not None and tracker.in_other_experiment(source) and tracker.find(tags) is None:
                self.sources[mid] = source
                if node.kind == "tune":
                    node.set_trial_attrs(mid, {"mlflow_run_id": source})
                self.stage_runs.make_reference_run(node, config, finished, source)  # here: inside the outbox
                return
            run_id = tracker.run(name, tags, parent=self.stage_runs.parent_run(node))
            tracker.client.set_tag(run_id, "wbsweep.method", node.method)
            tracker.client.set_tag(run_id, "wbsweep.stage", node.kind)
            if fused_trial is not None:  # trained with others in one process (trainables/fused.py)
                tracker.client.set_tag(run_id, "wbsweep.fused_trial", fused_trial)
            tracker.log_params(run_id, flat_params(cfg))
            tracker.log_dataset(run_id, cfg)
            records.write_run_file(hash_, cfg["seed"], "mlflow_run_id", run_id)
            self.run_ids[mid] = run_id
            if node.kind == "tune":
                node.set_trial_attrs(mid, {"mlflow_run_id": run_id})

        self.open.add(mid)
        self.ctx.outbox(f"the run of {node.label} seed {cfg['seed']}", start)
        self.ctx.progress.started(mid)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.stop_if_disk_full(trial, self.error_text(trial))  # a retry would fail the same way
        members = self.members(trial)
        what = self.label(members[0][1]) + (f" and {len(members) - 1} fused with it" if len(members) > 1 else "")
        self.ctx.progress.retrying(trial.trial_id, what)

    EPOCH_KEYS = ("train_loss", "val_acc", "lr")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(WARNINGS):
            self.note_warnings(trial, str(result[WARNINGS]))
        for i, row in epoch_rows(result):  # a single model's epoch, or a fused group's: a row per model
            self.log_epoch(member_id(trial.trial_id, i), row)

    def log_epoch(self, mid: str, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        metrics = {k: row[k] for k in self.EPOCH_KEYS}
        self.for_run(mid, f"epoch {epoch}", lambda run_id: self.tracker.log_metrics(run_id, metrics, step=epoch))
        self.logged_epochs.setdefault(mid, set()).add(epoch)

    def log_history(self, mid: str, history: list[dict]) -> None:
        """The epochs the throttled live reports skipped, once the model has finished. Only for a
        model trained in this run (one reused from disk already has its history in MLflow)."""
        seen = self.logged_epochs.pop(mid, None)
        if not seen:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, display_value(h[k]), now, int(h["epoch"])) for h in history if int(h["epoch"]) not in seen
                 for k in self.EPOCH_KEYS]
        for i in range(0, len(batch), 900):
            chunk = batch[i : i + 900]
            self.for_run(mid, "the epochs' metrics",
                         lambda run_id, chunk=chunk: self.tracker.client.log_batch(run_id, metrics=chunk))

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            self.trial_complete(trial)
        except Exception as exc:  # its rows, analyses or run files not written: a full disk stops the sweep
            if self.disk_full is None and disk_full(self.ctx.out, exc):
                self.disk_full = full_disk(self.ctx.out, f"writing what trial {trial.trial_id} trained",
                                           cause_text(exc))
                raise self.disk_full from None
            raise

    def trial_complete(self, trial) -> None:
        last = trial.last_result or {}
        members = self.members(trial)
        pruned_at = self.ctx.pruned_epoch(trial.trial_id)
        outcomes = model_outcomes(last, len(members))
        if len(members) == 1 and outcomes[0][0] is None and pruned_at is not None:
            self.record_pruned(trial, pruned_at)  # stopped early by its tune stage's ASHA: not failed
            return
        for (mid, config), (final, why) in zip(members, outcomes, strict=True):
            if final is None:
                self.model_failed(mid, config, why)
            else:
                self.model_done(mid, config, final)

    def model_done(self, mid: str, config: dict[str, Any], final: dict[str, Any]) -> None:
        """A model's trial ended with its final report: its rows, analyses and MLflow run (metrics, files)."""
        tracker, records = self.tracker, self.ctx.records
        node = self.graph.node_of(config)
        cfg = training_config(config)
        hash_, seed, exp = config_hash(cfg), cfg["seed"], self.ctx.exp
        # The rows first: they never wait for MLflow (whose run id they carry when the run exists)
        with storage.local_copy(records.runs, hash_, seed) as folder:
            run_id = self.run_ids.get(mid) or self.sources.get(mid)
            records.write(node.kind, node.method, cfg, records.model_rows(node.kind, node.method, cfg, final, run_id))
            # Table 3 / figure numbers, if any: DIR/analyses
            record_run_analyses(records.store, folder, spec=exp.name, preset=exp.preset, method=node.method)

        def log_files(run_id: str) -> None:  # a deferred call downloads them again (a remote storage)
            with storage.local_copy(records.runs, hash_, seed) as folder:
                tracker.log_artifacts(run_id, folder)
                if node.kind == "repeat":  # the models of the table: loadable with mlflow.pytorch.load_model
                    why = log_pytorch_model(tracker, run_id, folder)
                    if why:
                        self.ctx.progress.note(f"WARNING MLflow: {node.label} seed {seed}: PyTorch model not "
                                               f"logged ({why}); model.pt is in its run folder and artifacts")

        self.log_history(mid, final.get("history", []))
        metrics = final_metrics(final)
        self.for_run(mid, "the final metrics", lambda run_id: tracker.log_metrics(run_id, metrics,
                                                                                  step=int(final["epochs"])))
        self.for_run(mid, "the model's files", log_files)
        self.for_run(mid, "the end of a run", tracker.finish)
        self.open.discard(mid)
        self.ctx.progress.done(mid)

    def model_failed(self, mid: str, config: dict[str, Any], reason: str | None) -> None:
        reason = reason or "unknown error"
        self.end_run(mid, "FAILED", reason)
        self.ctx.progress.failed(f"{self.graph.node_of(config).label} trial {mid}: {reason}", mid)

    def record_pruned(self, trial, epoch: int) -> None:
        """A trial early stopping ended: a ``trials/`` row per LA variant with ``pruned`` true, the
        epochs it trained, its validation accuracy there and no test numbers; its MLflow run ends
        FINISHED with ``wbsweep.pruned`` = true and ``wbsweep.pruned_epoch``."""
        records = self.ctx.records
        node = self.graph.node_of(trial.config)
        last = trial.last_result or {}
        cfg = training_config(trial.config)
        hash_, val = config_hash(cfg), last.get("val_acc")
        blank = {"many": None, "medium": None, "few": None, "avg": None, "acc_per_class": None, "param": None}
        metrics = {"config_hash": hash_, "la": {la: {**blank, "val_acc": val} for la in cfg["la"]},
                   "fdr_train": None, "fdr_test": None, "epochs": int(epoch), "best_epoch": None,
                   "train_seconds": last.get("time_total_s"), "node": last.get("hostname"), "device": cfg["device"],
                   "data_fingerprint": cfg.get("data_fingerprint"),
                   "ray_node_id": records.run_file(hash_, cfg["seed"], "ray_node_id")}
        rows = records.model_rows(node.kind, node.method, cfg, metrics, self.run_ids.get(trial.trial_id))
        for row in rows:  # only the plain (no LA) validation accuracy is measured per epoch
            row.update(objective=None, pruned=True, val_acc=val if row["la"] == "none" else None)
        records.write(node.kind, node.method, cfg, rows)
        tags = {"wbsweep.pruned": "true", "wbsweep.pruned_epoch": str(int(epoch))}

        def end(run_id: str) -> None:
            for k, v in tags.items():
                self.tracker.client.set_tag(run_id, k, v)
            self.tracker.finish(run_id)

        self.for_run(trial.trial_id, "the end of a pruned run", end)
        self.open.discard(trial.trial_id)
        self.logged_epochs.pop(trial.trial_id, None)
        self.ctx.progress.done(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = self.error_text(trial)
        for mid, config in self.members(trial):
            self.model_failed(mid, config, reason)
        self.stop_if_disk_full(trial, reason)

    @staticmethod
    def error_text(trial) -> str:
        """The last line of a failed trial's error file (its exception), or "unknown error"."""
        if trial.error_file:
            try:
                with open(trial.error_file) as fh:
                    lines = [ln for ln in fh.read().strip().splitlines() if ln.strip()]
                return lines[-1] if lines else "unknown error"
            except OSError:
                pass
        return "unknown error"

    def stop_if_disk_full(self, trial, reason: str) -> None:
        """Stop the sweep in one line (:mod:`orchestrator.sweep.diskfull`) when a trial failed on a full
        disk, or while --out's disk is full (its error file, on that disk, may be empty)."""
        if self.disk_full is None and disk_full(self.ctx.out, text=reason):
            self.disk_full = full_disk(self.ctx.out, f"trial {trial.trial_id} failed", reason)
            raise self.disk_full

    def end_run(self, mid: str, status: str, reason: str) -> None:
        """End a model's run that did not finish: ``status`` KILLED or FAILED, the reason in its
        ``wbsweep.error`` tag."""
        self.for_run(mid, "the end of a run", lambda run_id: self.tracker.finish(run_id, status, reason))
        self.open.discard(mid)

    def close(self, status: str, reason: str) -> None:
        """The sweep stops: the runs of the trials it stopped end ``status`` with the ``reason``."""
        for trial_id in sorted(self.open):
            self.end_run(trial_id, status, reason)
