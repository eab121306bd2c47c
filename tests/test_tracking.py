"""MLflow runs left RUNNING by a driver that died are ended when the next sweep starts; a run that
finishes drops a stale error tag; tracking calls wait out a store that is unavailable for a while."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from orchestrator.record.records import SweepRecords
from orchestrator.sweep.callbacks import close_interrupted_runs
from orchestrator.tracking.tracker import Outbox, Tracker


def test_runs_of_a_dead_driver_end_finished_or_killed(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "table4", tmp_path / "mlartifacts")
    parent = tracker.run("tune/wd", {"wbsweep.stage": "tune", "wbsweep.method": "wd"})
    done = tracker.run("wd seed0", {"wbsweep.config_hash": "aaa", "wbsweep.seed": "0"}, parent=parent)
    lost = tracker.run("wd seed0 t2", {"wbsweep.config_hash": "bbb", "wbsweep.seed": "0"}, parent=parent)
    ended = tracker.run("wd seed1", {"wbsweep.config_hash": "aaa", "wbsweep.seed": "1"}, parent=parent)
    tracker.finish(ended)
    runs = tmp_path / "runs"
    folder = runs / "aaa" / "seed0"  # this model finished after its driver died
    folder.mkdir(parents=True)
    metrics = {"fdr_train": 2.0, "fdr_test": 1.0, "objective": 50.0, "best_epoch": 3, "train_seconds": 9.0,
               "epochs": 4, "la": {"none": {"param": None, "val_acc": 50.0, "many": 1.0, "medium": 2.0,
                                             "few": 3.0, "avg": 2.0}}}
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "metrics.json").write_text(json.dumps(metrics))

    close_interrupted_runs(tracker, SweepRecords(str(tmp_path), "table4", "cpu", versions={}))

    get = tracker.client.get_run
    assert get(done).info.status == "FINISHED" and get(done).data.metrics["fdr_test"] == 1.0
    assert {a.path for a in tracker.client.list_artifacts(done)} == {"metrics.json", "model.pt"}
    assert get(lost).info.status == "KILLED" and "interrupted" in get(lost).data.tags["wbsweep.error"]
    assert get(ended).info.status == "FINISHED" and "wbsweep.error" not in get(ended).data.tags
    assert get(parent).info.status == "RUNNING"  # a stage's run: its resumed stage takes it over
    # the lost model trained later re-attaches to its run, which runs again
    assert tracker.run("wd seed0 t2", {"wbsweep.config_hash": "bbb", "wbsweep.seed": "0"}, parent=parent) == lost
    assert get(lost).info.status == "RUNNING"


def test_a_run_that_finishes_after_all_loses_its_error_tag(tmp_path):
    """A model run stopped (KILLED, tagged why) and re-attached by a resume ends FINISHED without
    the stale ``wbsweep.error``; a run that fails again gets its new reason."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "table4", tmp_path / "mlartifacts")
    tags = {"wbsweep.config_hash": "aaa", "wbsweep.seed": "0"}
    run_id = tracker.run("wd seed0", tags)
    tracker.client.set_tag(run_id, "wbsweep.error", "interrupted: the sweep was stopped")
    tracker.finish(run_id, "KILLED")
    assert tracker.run("wd seed0", tags) == run_id
    tracker.finish(run_id)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and "wbsweep.error" not in run.data.tags
    tracker.finish(run_id)  # no tag to remove: fine


def test_the_outbox_defers_calls_while_the_store_is_unreachable_and_catches_up(tmp_path, monkeypatch):
    """Real MLflow clients: a tracking server that does not answer (its client's own retries off),
    then the store back. Calls are retried, deferred in order with ONE warning line, made at the
    next try; an error that waiting does not cure is one line and dropped; what is still missing
    at the end is one line. Nothing raises."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = MlflowClient(f"http://127.0.0.1:{sock.getsockname()[1]}")  # bound, not listening: refused
    sock.close()
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "table4", tmp_path / "mlartifacts")
    run_id = tracker.run("wd seed0", {"wbsweep.config_hash": "aaa", "wbsweep.seed": "0"})
    store = SimpleNamespace(client=dead)
    notes: list[str] = []
    outbox = Outbox(notes.append, retry_s=1.5)
    attempts = []
    with pytest.raises(MlflowException):  # the client's first call imports its REST modules: not timed below
        dead.get_run(run_id)

    def epoch1() -> None:
        attempts.append(time.monotonic())
        store.client.log_metric(run_id, "val_acc", 1.0, step=1)

    outbox("epoch 1", epoch1)
    assert len(attempts) >= 2  # retried with back-off for retry_s, then deferred
    outbox("epoch 2", lambda: store.client.log_metric(run_id, "val_acc", 2.0, step=2))  # queued behind it
    assert len(outbox.queue) == 2 and len(attempts) >= 2
    assert len(notes) == 1 and "unavailable" in notes[0] and "deferred" in notes[0] and "\n" not in notes[0]

    store.client = tracker.client  # the store is back
    outbox.catch_up()
    assert len(outbox.queue) == 2  # not before retry_s has passed
    time.sleep(1.6)
    outbox.catch_up()
    assert not outbox.queue
    history = tracker.client.get_metric_history(run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0)]
    assert "available again: 2 deferred" in notes[-1]

    outbox("a tag of a run deleted by hand", lambda: tracker.client.set_tag("0" * 32, "x", "y"))
    assert "not logged" in notes[-1] and not outbox.queue

    store.client = dead
    outbox("the end of a run", lambda: store.client.set_terminated(run_id))
    outbox.catch_up(final=True)
    assert "1 tracking call(s) could not be made" in notes[-1] and "\n" not in notes[-1]
    assert tracker.client.get_run(run_id).info.status == "RUNNING"


def test_an_unavailable_store_is_named_by_its_innermost_cause() -> None:
    """MLflow may wrap a locked SQLite store in an MlflowException whose first line is SQLAlchemy's
    autoflush note (seen on a loaded machine): the warning names the lock, not the wrapper."""
    import sqlite3

    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from orchestrator.tracking.tracker import first_line, transient, transient_cause

    def wrapped() -> MlflowException:
        try:
            try:
                raise sqlite3.OperationalError("database is locked")
            except sqlite3.OperationalError as lock:
                raise sqlalchemy.exc.OperationalError("UPDATE runs ...", {}, lock) from lock
        except sqlalchemy.exc.OperationalError as exc:
            try:
                raise MlflowException("(raised as a result of Query-invoked autoflush; consider using a "
                                      "session.no_autoflush block)", error_code=TEMPORARILY_UNAVAILABLE) from exc
            except MlflowException as outer:
                return outer

    exc = wrapped()
    assert transient(exc) and "database is locked" in first_line(transient_cause(exc))
    assert "autoflush" in first_line(exc)
    plain = MlflowException("run not found", error_code=RESOURCE_DOES_NOT_EXIST)
    assert not transient(plain) and transient_cause(plain) is None
    busy = MlflowException("try later", error_code=TEMPORARILY_UNAVAILABLE)
    assert transient_cause(busy) is busy


def test_metrics_reach_mlflow_without_float_noise():
    """A percentage's float arithmetic leaves 88.00000000000001; MLflow gets 12 significant digits,
    small values keep theirs (a learning rate near the end of the cosine schedule)."""
    from orchestrator.tracking.tracker import display_value

    assert display_value(0.1 * 3 * 100 / 3 * 8.8 / 0.1 / 10) == 88.0 != 0.1 * 3 * 100 / 3 * 8.8 / 0.1 / 10
    assert display_value(1.2345678901234567e-9) == 1.23456789012e-9
    assert display_value(379.10600123456789) == 379.106001235
