"""The SQLite stores are created whole (orchestrator/record/stores.py): under a temporary name, then linked
into place; what a killed creation leaves is removed, a store made meanwhile by another process is
kept, and an unfinished store from an earlier version is made again or refused with what to do.
(tests/test_kill_instants.py kills real creations.)"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from orchestrator.record import stores
from orchestrator.tracking.tracker import Tracker, default_tracking_uri
from trainables.errors import WbsweepError


def sql(db: Path, statement: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute(statement).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def open_files_under(folder: Path) -> list[str]:
    """Files under ``folder`` this process holds open (Linux: /proc/self/fd)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def one_table(url: str, name: str = "t") -> None:
    """A build function: a database with one table at the SQLite ``url``."""
    sql(stores.sqlite_file(url), f"CREATE TABLE {name} (x)")


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:////abs/dir/mlflow.db", "/abs/dir/mlflow.db"),
    ("sqlite:///rel/mlflow.db", "rel/mlflow.db"),
    ("sqlite:////abs/mlflow.db?timeout=20", "/abs/mlflow.db"),
    ("sqlite://", None), ("sqlite:///:memory:", None), ("http://127.0.0.1:5000", None),
    ("postgresql://u:p@host/db", None),
])
def test_the_database_file_of_a_tracking_uri(url, path):
    assert stores.sqlite_file(url) == (Path(path) if path else None)


def test_the_temporary_url_keeps_the_query():
    url = stores.with_database("sqlite:////abs/mlflow.db?timeout=20", Path("/abs/.mlflow.db.creating-h-1"))
    assert url == "sqlite:////abs/.mlflow.db.creating-h-1?timeout=20"


def test_a_new_store_is_built_under_a_temporary_name_then_linked_into_place(tmp_path):
    db = tmp_path / "x.db"
    seen = []

    def build(url: str) -> None:
        tmp = stores.sqlite_file(url)
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.db.creating-")
        assert not db.exists()  # the real name never names a store being built
        one_table(url)

    assert stores.create_whole(db, f"sqlite:///{db}", build)
    assert sql(db, "SELECT name FROM sqlite_master") == [("t",)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]  # the temporary name is gone
    assert not stores.create_whole(db, f"sqlite:///{db}", build) and len(seen) == 1  # it exists: left alone


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_the_real_stores_are_built_without_a_connection_left_open(tmp_path):
    """A connection kept open to the temporary file would write to the store behind its new name."""
    tracker = Tracker(default_tracking_uri(tmp_path), "table4", tmp_path / "mlartifacts")
    storage, note = stores.open_optuna_storage(tmp_path / "optuna.db")
    assert tracker.notes == [] and note is None
    assert not [f for f in open_files_under(tmp_path) if ".creating-" in f]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["mlflow.db", "optuna.db"]


def test_what_a_killed_creation_left_is_removed_and_a_running_ones_kept(tmp_path):
    db = tmp_path / "x.db"
    prefix = f".x.db.creating-{os.uname().nodename}-"
    killed, running = dead_pid(), os.getppid()
    for name in (f"{prefix}{killed}", f"{prefix}{killed}-journal", f"{prefix}{running}"):
        (tmp_path / name).write_bytes(b"partial")
    stores.create_whole(db, f"sqlite:///{db}", one_table)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{prefix}{running}", "x.db"]


def test_a_stale_journal_without_its_database_is_not_applied_to_the_new_store(tmp_path):
    db = tmp_path / "x.db"
    (tmp_path / "x.db-journal").write_bytes(b"journal of a database deleted since")
    stores.create_whole(db, f"sqlite:///{db}", one_table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]


def test_a_store_another_process_created_meanwhile_is_kept(tmp_path):
    db = tmp_path / "x.db"

    def build_while_another_wins(url: str) -> None:
        one_table(url, "ours")
        one_table(f"sqlite:///{db}", "theirs")  # e.g. a second sweep into the same folder, faster

    assert not stores.create_whole(db, f"sqlite:///{db}", build_while_another_wins)
    assert sql(db, "SELECT name FROM sqlite_master") == [("theirs",)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]


@pytest.fixture(scope="module")
def whole_mlflow_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    Tracker(default_tracking_uri(out), "table4", out / "mlartifacts")
    return out / "mlflow.db"


@pytest.mark.parametrize("damage", ["DELETE FROM alembic_version", "CREATE TABLE _alembic_tmp_runs (x)",
                                    "UPDATE alembic_version SET version_num = '451aebb31d03'"])
def test_an_unfinished_mlflow_store_without_runs_is_moved_aside_and_made_again(tmp_path, whole_mlflow_store, damage):
    """What an earlier version's killed creation left: no schema version yet, a migration's copy of
    a table, an early schema version (MLflow would go on migrating it in place)."""
    shutil.copy(whole_mlflow_store, tmp_path / "mlflow.db")
    sql(tmp_path / "mlflow.db", damage)
    tracker = Tracker(default_tracking_uri(tmp_path), "table4", tmp_path / "mlartifacts")
    assert len(tracker.notes) == 1 and "unfinished MLflow tracking store" in tracker.notes[0], tracker.notes
    aside = [p.name for p in tmp_path.glob("mlflow.db.unfinished-*")]
    assert len(aside) == 1 and aside[0] in tracker.notes[0]
    run = tracker.run("wd seed0", {"wbsweep.config_hash": "abc", "wbsweep.seed": "0"})
    assert tracker.client.get_run(run).info.status == "RUNNING"


def test_an_unfinished_mlflow_store_with_runs_is_refused_with_what_to_do(tmp_path):
    tracker = Tracker(default_tracking_uri(tmp_path), "table4", tmp_path / "mlartifacts")
    tracker.run("wd seed0", {"wbsweep.config_hash": "abc", "wbsweep.seed": "0"})
    sql(tmp_path / "mlflow.db", "CREATE TABLE _alembic_tmp_runs (x)")  # a migration by a newer MLflow, cut short
    with pytest.raises(WbsweepError) as err:
        Tracker(default_tracking_uri(tmp_path), "table4", tmp_path / "mlartifacts")
    msg = str(err.value)
    assert "\n" not in msg and "_alembic_tmp_runs" in msg and "holds 1 row(s)" in msg and "move it away" in msg
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["mlflow.db"]  # untouched


def test_an_unfinished_optuna_storage_is_made_again_when_empty_and_refused_with_trials(tmp_path):
    db = tmp_path / "optuna.db"
    storage, _ = stores.open_optuna_storage(db)
    storage.remove_session()
    storage.engine.dispose()
    sql(db, "DELETE FROM alembic_version")  # Optuna records it last when it creates a storage
    storage, note = stores.open_optuna_storage(db)
    assert note is not None and "unfinished Optuna database" in note
    study = optuna.create_study(storage=storage, study_name="s")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    storage.remove_session()
    storage.engine.dispose()
    sql(db, "DELETE FROM alembic_version")
    with pytest.raises(WbsweepError, match=r"holds 1 row\(s\); move it away: the tune stages then search again"):
        stores.open_optuna_storage(db)
