"""MLflow layout: an experiment per spec, a parent run per stage, a child run per trained model.

All logging happens in the driver through an explicit :class:`MlflowClient` (no global active run),
from Ray Tune callbacks: the workers never open the tracking store, so a SQLite store works with
many concurrent trials and a remote tracking server needs to be reachable from the driver only.
Runs are found again by their tags, so a resumed sweep re-attaches to its runs instead of
duplicating them. A SQLite store is created whole before MLflow opens it (see :mod:`orchestrator.record.stores`):
MLflow would create it step by step in place, and a kill in those seconds broke the folder for good.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.record import stores
from orchestrator.record.provenance import mlflow_tags
from trainables.errors import WbsweepError, disk_full_cause, disk_full_reason, exception_chain

#: Tags of every experiment wbsweep makes: ``mlflow.experimentKind`` tells MLflow 3's UI these are
#: model-training runs, so an experiment opens on its runs table (without it, on the GenAI traces view).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def flat_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config as a run's params: its keys with a value."""
    return {k: v for k, v in cfg.items() if v is not None}


def final_metrics(final: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a finished model, LA variants prefixed (``mult.acc_avg``)."""
    out = {k: final[k] for k in ("fdr_train", "fdr_test", "objective", "best_epoch", "train_seconds")}
    for la, r in final["la"].items():
        for k in ("many", "medium", "few", "avg", "val_acc"):
            out[f"{la}.{'acc_' + k if k != 'val_acc' else k}"] = r[k]
        if r["param"] is not None:
            out[f"{la}.{'tau' if la == 'add' else 'gamma'}"] = r["param"]
    return out


def display_value(value: float) -> float:
    """A metric as MLflow stores it: rounded to 12 significant digits, so the UI shows 88.0 and not the
    88.00000000000001 that a percentage's float arithmetic leaves (the Parquet rows keep every digit;
    12 digits are far below any difference a metric here can tell)."""
    return float(f"{float(value):.12g}")


def default_tracking_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def store_error(tracking_uri: str, exc: Exception) -> WbsweepError:
    """The one-line error for a tracking store that cannot be reached or opened (the user's to fix)."""
    return WbsweepError(f"cannot use the MLflow tracking store {tracking_uri}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def prepare_store(tracking_uri: str, artifact_root: Path | str | None, home: Path | None = None) -> list[str]:
    """Make a SQLite tracking store whole before MLflow opens it (see :mod:`orchestrator.record.stores`:
    MLflow would create it step by step in place); notes of what was done (none for other stores).

    A results folder's own store (``DIR/mlflow.db``, its artifacts in ``home`` = ``DIR/mlartifacts``:
    given, or ``artifact_root`` when that lies beside the store) that records another folder's
    artifact locations (the folder was moved or copied) is re-pointed to ``home`` first
    (:func:`orchestrator.record.stores.repoint_artifacts`), with a note."""
    try:
        db = stores.sqlite_file(tracking_uri)
        if db is None:
            return []
        if home is None and isinstance(artifact_root, Path) and \
                db.resolve() == (artifact_root.parent / "mlflow.db").resolve():
            home = artifact_root
        notes = [stores.prepare_mlflow_store(db, tracking_uri, artifact_root)]
        if home is not None:
            notes.append(stores.repoint_artifacts(db, home))
    except WbsweepError:
        raise
    except Exception as exc:
        raise store_error(tracking_uri, exc) from None
    return [n for n in notes if n]


class Tracker:
    """Thin wrapper around MlflowClient for the runs of one spec."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None):
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.notes = prepare_store(tracking_uri, artifact_root)  # an unfinished store made again, say
        try:
            self.client = MlflowClient(tracking_uri)  # opens the store: a damaged one fails here
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = artifact_root.resolve().as_uri() if artifact_root is not None else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location,
                                                                   tags=EXPERIMENT_TAGS)
            else:
                self.experiment_id = exp.experiment_id
                for key, value in EXPERIMENT_TAGS.items():  # an experiment made by an earlier version
                    if exp.tags.get(key) != value:
                        self.client.set_experiment_tag(self.experiment_id, key, value)
        except Exception as exc:  # any failure to reach or open the store is the user's to fix
            raise store_error(tracking_uri, exc) from None

    def find(self, tags: dict[str, str]) -> str | None:
        """The id of a run of this experiment with these tags, or None."""
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1)
        return runs[0].info.run_id if runs else None

    def run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """The run with these identifying ``tags``, created if it does not exist yet."""
        found = self.find(tags)
        if found:
            # a resumed stage, or a model whose training was interrupted, is running again
            self.client.update_run(found, status="RUNNING")
            return found
        all_tags = {**mlflow_tags(), **tags}  # MLflow's source tags: the code that made the run
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def in_other_experiment(self, run_id: str) -> bool:
        """Whether the run ``run_id`` exists in another experiment than this tracker's."""
        try:
            return self.client.get_run(run_id).info.experiment_id != self.experiment_id
        except Exception:  # noqa: BLE001 - deleted by hand, another store: this experiment makes its own
            return False

    def running_model_runs(self) -> list[tuple[str, str, int]]:
        """(run id, config hash, seed) of the model runs still marked RUNNING: at the start of a
        sweep, those a driver that died (kill -9, a lost head node) left behind."""
        runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                       max_results=5000)
        return [(r.info.run_id, r.data.tags["wbsweep.config_hash"], int(r.data.tags["wbsweep.seed"]))
                for r in runs if "mlflow.parentRunId" in r.data.tags and "wbsweep.config_hash" in r.data.tags]

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in sorted(params.items()) if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def log_dataset(self, run_id: str, cfg: dict[str, Any]) -> None:
        """The data a model was trained on as the run's MLflow dataset input (context "training"; the
        UI's "Datasets used"): named by the dataset, its imbalance ratio and split protocol, its digest
        the split's content fingerprint (trainables/data.py ``data_fingerprint``), its source the data
        root (or the package, for embedded data). Only this description is stored, never the images.
        Logging it again is a no-op (MLflow keeps one input per dataset and run)."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        from orchestrator._adapters.mlflow_entities import dataset_input

        rho = "" if cfg.get("rho") is None else f" rho={cfg['rho']:g}"
        name = f"{cfg['dataset']}{rho} split={cfg['split']} val={cfg['val_per_class']}/class"
        root = cfg.get("data_root")
        source = (resolve_dataset_source(str(root)) if root
                  else CodeDatasetSource({"wbsweep.dataset": f"{cfg['dataset']} (embedded in the package)"}))
        digest = str(cfg.get("data_fingerprint") or "unknown")
        self.client.log_inputs(run_id, [dataset_input(source, name, digest, context="training")])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, display_value(v), now, step) for k, v in metrics.items() if v is not None and v == v]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_artifacts(self, run_id: str, folder: Path) -> None:
        """The files of a model's run folder as the run's artifacts. With artifacts in a local folder
        (a local store), each file is a hard link to the run folder's (stored once: :func:`link_tree`);
        elsewhere (a tracking server, another filesystem) they are uploaded."""
        if not link_tree(Path(folder), local_artifact_dir(self.client.get_run(run_id).info.artifact_uri)):
            self.client.log_artifacts(run_id, str(folder))

    def finish(self, run_id: str, status: str = "FINISHED", reason: str = "") -> None:
        """End a run ``status``; ``reason`` (why a run did not finish) goes into its ``wbsweep.error``
        tag. A run that finishes after all (re-attached by a resume) loses the reason an earlier stop
        or failure left there."""
        if reason:
            self.client.set_tag(run_id, "wbsweep.error", reason[:5000])
        elif status == "FINISHED" and "wbsweep.error" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, "wbsweep.error")
        self.client.set_terminated(run_id, status=status)


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a ``file:`` artifact URI (or a plain path); None for any other scheme."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_uri:
        return Path(artifact_uri)
    return None


def link_tree(src: Path, dst: Path | None) -> bool:
    """Hard-link every file under ``src`` into ``dst`` (same relative paths; a file already there
    replaced): the run folder's files stored once (a model.pt, logits.npz of hundreds of MB at paper
    scale), not copied into mlartifacts/. False (nothing done or some files linked, the caller copies
    them all) when ``dst`` is not a local folder or a link cannot be made (another filesystem)."""
    import os

    if dst is None:
        return False
    try:
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.link")
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
            os.replace(tmp, target)
    except OSError:
        return False
    return True


def first_line(exc: BaseException) -> str:
    """An exception on one line; a full disk as what says so, not SQLAlchemy's autoflush note."""
    if disk_full_cause(exc) is not None:
        return f"no space left on its disk ({disk_full_reason(exc)})"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def quiet_store_errors() -> None:
    """MLflow's SQL store logs every database error with a traceback of fifty lines before it raises:
    the callers say it in one line (:class:`Outbox`, the report's run)."""
    quiet = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _QuietLockErrors) for f in quiet.filters):
        quiet.addFilter(_QuietLockErrors())


def transient(exc: BaseException) -> bool:
    """Whether waiting may cure what made a tracking call fail: a SQLite store locked by another
    process (MLflow wraps SQLAlchemy's OperationalError in an MlflowException with error code
    TEMPORARILY_UNAVAILABLE), a tracking server unreachable after its client's own retries (an
    MlflowException caused by a requests error), or answering 5xx/429 (a RestException)."""
    return transient_cause(exc) is not None


def transient_cause(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that makes it :func:`transient` (the innermost that says why:
    "database is locked" rather than SQLAlchemy's autoflush wrapper around it), or None."""
    import sqlite3

    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException, RestException

    found = None
    for e in itertools.islice(exception_chain(exc), 10):
        if isinstance(e, OSError | sqlite3.OperationalError | sqlalchemy.exc.OperationalError):
            return e  # refused or reset connections, timeouts (requests' are OSErrors), a locked database
        if isinstance(e, RestException):
            return e if e.get_http_status_code() >= 500 or e.get_http_status_code() == 429 else found
        if found is None and isinstance(e, MlflowException) and e.error_code in (
                "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED"):
            found = e  # a cause further in may say more
    return found


class _QuietLockErrors(logging.Filter):
    """MLflow logs every SQLAlchemy OperationalError (a locked SQLite store, a full disk) with a
    traceback of fifty lines before it raises; the callers say it in one (:func:`quiet_store_errors`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


class Outbox:
    """The tracking calls of a running sweep, made from Ray Tune's callbacks, kept from stopping it.

    A call the store refuses for a while (SQLite locked by another process: a second command on
    the folder, ``mlflow gc``, a database browser, a backup; a tracking server down or overloaded)
    is retried with back-off for up to ``retry_s`` seconds (``$WBSWEEP_TRACKING_RETRY_S``, default
    30). If the store is still unavailable, that call and every later one wait in a queue, in their
    order, with one warning line; the queue is tried again at later calls (at most every
    ``retry_s``) and at the end of the sweep (:meth:`catch_up`). The Parquet rows and the run
    folders are written regardless: they are the record, MLflow a view of it. An error that waiting
    does not cure (a run deleted by hand) is one warning line, and that call is dropped.

    Calls are closures, run in order: one may use what an earlier one made (a run's id)."""

    def __init__(self, note: Callable[[str], None], retry_s: float | None = None):
        from orchestrator.environment import env_seconds

        self.note = note
        self.retry_s = env_seconds("WBSWEEP_TRACKING_RETRY_S", 30.0) if retry_s is None else retry_s
        self.queue: deque[tuple[str, Callable[[], object]]] = deque()
        self.down = ""  # why the store is unavailable ("" while it is not)
        self.next_try = 0.0  # when a deferred call is tried again
        self.caught_up = 0  # deferred calls made since
        self.full = False  # the store's disk is full (not waited for at the end)
        quiet_store_errors()

    def __call__(self, what: str, call: Callable[[], object]) -> None:
        """Make ``call`` (``what`` names it in a warning) now, or later if the store is unavailable."""
        self.catch_up()
        self.queue.append((what, call))
        if len(self.queue) == 1:
            self._drain(time.monotonic() + self.retry_s)

    def catch_up(self, final: bool = False) -> None:
        """Try the deferred calls again: during the sweep once ``retry_s`` has passed since the last
        try, each once; ``final`` (the sweep ends): now, retrying for up to ``retry_s``, then a line
        about what could not be logged."""
        if self.queue and (final or time.monotonic() >= self.next_try):
            # a full disk is not waited for at the end: the sweep stops on it, and waiting frees nothing
            self._drain(time.monotonic() + (self.retry_s if final and not self.full else 0.0))
        if final and self.queue:
            again = "once space is freed" if self.full else "once the store is available"
            self.note(f"WARNING MLflow: {len(self.queue)} tracking call(s) could not be made ({self.down}); "
                      f"results/ and the run folders hold everything. Run the same command again {again}: it "
                      "ends the model runs left RUNNING with their metrics and files.")
            self.queue.clear()

    def _drain(self, deadline: float) -> None:
        from mlflow.exceptions import MlflowException

        started = time.monotonic()
        while self.queue:
            what, call = self.queue[0]
            try:
                self._retrying(call, deadline)
            except Exception as exc:
                if transient(exc):
                    self.next_try = time.monotonic() + self.retry_s
                    self.full = disk_full_cause(exc) is not None
                    if not self.down:
                        self.down = (f"no space left on the store's disk: {disk_full_reason(exc)}"
                                     if self.full else first_line(transient_cause(exc) or exc))
                        self.note(f"WARNING MLflow tracking store unavailable ({self.down}; retried for "
                                  f"{time.monotonic() - started:.0f} s): its logging is deferred and caught up later; "
                                  "the sweep goes on, results and run folders are written as usual")
                    return
                self.queue.popleft()
                if not isinstance(exc, MlflowException):
                    raise  # a bug, not the store
                self.note(f"WARNING MLflow: {what} not logged: {first_line(exc)}")
                continue
            self.queue.popleft()
            self.caught_up += bool(self.down)
        if self.down:
            self.note(f"MLflow available again: {self.caught_up} deferred tracking call(s) made")
            self.down, self.caught_up = "", 0

    @staticmethod
    def _retrying(call: Callable[[], object], deadline: float) -> None:
        delay = 0.5
        while True:
            try:
                call()
                return
            except Exception as exc:
                if not transient(exc) or time.monotonic() + delay > deadline or disk_full_cause(exc) is not None:
                    raise  # a full disk: deferred at once, not retried with back-off
            time.sleep(delay)
            delay = min(2 * delay, 8.0)
