"""A sweep killed (SIGKILL, its whole process group) at any instant from 0 s on leaves a folder the
same command resumes: every store it creates is either absent or whole, never half made.

MLflow builds its SQLite store in some sixty schema migrations that each commit on their own; a kill
in those seconds used to leave a store that no later run could open ("table ... already exists"),
so the folder was broken for good. Most kill instants here fall in the creation of the stores:

* 8 instants in the creation step alone (the Tracker and the Optuna storage, as `wbsweep run` opens
  them, in a subprocess: no Ray, seconds each), each in a fresh folder, each followed by opening the
  stores again here;
* 5 instants of the real `wbsweep run table4 --preset smoke`, chained in one folder (0, 0.3, 1 and
  2 s after its start, then half way through the MLflow store's creation, after Ray has started),
  then a sixth, of the driver alone, once some models have finished; then the same command once
  more, which must finish with the rows of an uninterrupted sweep, training nothing twice.

The instants inside a creation are conditions on files (the store being created has so many tables),
not delays, so that they land there on a slow machine as well as on a fast one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import pytest
from helpers import assert_nothing_left_open, assert_same_rows, mlflow_children, mlflow_runs, trained, wbsweep_here

from orchestrator.record.stores import open_optuna_storage
from orchestrator.tracking.tracker import Tracker, default_tracking_uri

pytestmark = pytest.mark.slow

#: What `wbsweep run` does to open its stores (orchestrator/sweep/driver.py, Sweep.run and Sweep.optuna_storage).
OPEN_STORES = """
import sys
from pathlib import Path
from orchestrator.record.stores import open_optuna_storage
from orchestrator.tracking.tracker import Tracker, default_tracking_uri
out = Path(sys.argv[1])
Tracker(default_tracking_uri(out), "table4", out / "mlartifacts")
open_optuna_storage(out / "optuna.db")
"""

#: When to kill: called with the folder and the seconds since the process started.
Condition = Callable[[Path, float], bool]


# --- what the folder holds -----------------------------------------------------------------------------


def store_files(out: Path, name: str) -> list[Path]:
    """The SQLite files of the store ``name`` in ``out``, under its own name or a temporary one
    while it is being created (not the journals, not stores set aside)."""
    return [p for p in out.glob(f"*{name}*")
            if not p.name.endswith(("-journal", "-wal", "-shm")) and ".unfinished-" not in p.name]


def table_count(db: Path) -> int:
    """Tables in the SQLite file ``db`` now; 0 when it cannot be read at this instant (locked, gone)."""
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=0.05)
    except sqlite3.Error:
        return 0
    try:
        return con.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def at_once(out: Path, elapsed: float) -> bool:
    return True


def after(seconds: float) -> Condition:
    return lambda out, elapsed: elapsed >= seconds


def appears(name: str) -> Condition:
    """The store ``name`` exists under any name (its creation has begun)."""
    return lambda out, elapsed: bool(store_files(out, name))


def exists(name: str) -> Condition:
    """The file ``name`` exists under its own name."""
    return lambda out, elapsed: (out / name).exists()


def tables_at_least(name: str, n: int) -> Condition:
    """The store ``name`` has ``n`` tables or more, under any name (being created, or complete)."""
    return lambda out, elapsed: any(table_count(p) >= n for p in store_files(out, name))


def leftovers(out: Path) -> list[str]:
    """Files no resumed run should leave: temporary stores, stores set aside as unfinished."""
    return sorted(p.name for p in out.glob("*") if ".creating-" in p.name or ".unfinished-" in p.name)


# --- killing ---------------------------------------------------------------------------------------


def start(args: list[str], output=subprocess.PIPE) -> subprocess.Popen:
    """``python ARGS`` in a session (and process group) of its own, so that it can be killed whole."""
    return subprocess.Popen([sys.executable, *args], stdout=output, stderr=output, text=True, start_new_session=True)


def kill_when(args: list[str], out: Path, condition: Condition, timeout: float = 300) -> bool:
    """Start ``python ARGS`` and SIGKILL its process group as soon as ``condition`` holds; whether
    it was still running then (False: it had ended, successfully, before the instant came)."""
    with tempfile.TemporaryFile("w+") as output:  # not a pipe: a full one would stop it before the instant
        started = time.monotonic()
        proc = start(args, output)
        while not condition(out, time.monotonic() - started):
            if proc.poll() is not None:
                output.seek(0)
                assert proc.returncode == 0, f"it failed before the kill: {output.read()[-3000:]}"
                return False
            assert time.monotonic() - started < timeout, "the kill instant never came"
            time.sleep(0.002)
        running = proc.poll() is None
        with contextlib.suppress(ProcessLookupError):  # it has just ended
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return running


def wbsweep_run(out: Path) -> list[str]:
    return ["-m", "orchestrator.cli", "run", "table4", "--preset", "smoke", "--out", str(out)]


# --- the creation step -------------------------------------------------------------------------------


def use_mlflow_store(out: Path) -> Tracker:
    """Open (or create) the MLflow store in this process as a resumed sweep does, and log to it."""
    tracker = Tracker(default_tracking_uri(out), "table4", out / "mlartifacts")
    run = tracker.run("wd seed0", {"wbsweep.config_hash": "abc", "wbsweep.seed": "0"})
    tracker.log_metrics(run, {"val_acc": 50.0})
    tracker.finish(run)
    assert tracker.client.get_run(run).data.metrics["val_acc"] == 50.0
    return tracker


def use_optuna_storage(out: Path) -> None:
    """Open (or create) the Optuna storage in this process as a resumed sweep does, and add a trial."""
    storage, _ = open_optuna_storage(out / "optuna.db")
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    assert len(study.trials) >= 1


def set_aside(out: Path) -> list[str]:
    """Stores a resumed run found unfinished under their own name (and moved aside)."""
    return sorted(p.name for p in out.glob("*.unfinished-*"))


@pytest.fixture(scope="module")
def whole_store_tables(tmp_path_factory) -> int:
    """How many tables a whole MLflow store has (with this MLflow version)."""
    out = tmp_path_factory.mktemp("whole")
    use_mlflow_store(out)
    return table_count(out / "mlflow.db")


def test_a_kill_while_the_stores_are_created_leaves_them_absent_or_whole(tmp_path, whole_store_tables):
    """After each kill, a store under its own name must open and take writes as it is; one that
    is not there is created afresh by the next run (as tests/test_stores.py checks, removing what
    the killed creation left under a temporary name; the end-to-end test below checks it too)."""
    n = whole_store_tables
    instants = {
        "0 s": at_once,
        "MLflow's store appears": appears("mlflow.db"),
        **{f"MLflow's store has {k} tables": tables_at_least("mlflow.db", k) for k in (n // 4, n // 2, 3 * n // 4)},
        "mlflow.db appears": exists("mlflow.db"),
        "Optuna's store appears": appears("optuna.db"),
        "optuna.db appears": exists("optuna.db"),
    }
    landed = []
    for i, (label, instant) in enumerate(instants.items()):
        out = tmp_path / f"kill{i}"
        out.mkdir()
        if kill_when(["-c", OPEN_STORES, str(out)], out, instant):
            landed.append(label)
        try:
            if (out / "mlflow.db").exists():
                use_mlflow_store(out)
            if (out / "optuna.db").exists():
                use_optuna_storage(out)
        except Exception as exc:
            raise AssertionError(f"killed when {label}: a store no longer opens: {exc}") from exc
        assert set_aside(out) == [], f"killed when {label}: a store was left unfinished under its own name"
    assert len(landed) >= len(instants) // 2, f"too few kills came before the end: {landed}"


# --- the real command ---------------------------------------------------------------------------------


def test_wbsweep_run_killed_early_again_and_again_then_mid_sweep_then_resumes(tmp_path, smoke_reference,
                                                                             whole_store_tables, capsys):
    """Five kills of the whole process group in one folder, each run starting where the killed one
    left it: during Python's start, the imports, the preflight (dataset cache), then half way
    through the MLflow store's creation (Ray is up by then); each later run only needs to get that
    far, so the chain costs one Ray start plus seconds. Then `kill -9` of the driver alone once some
    models have finished (Ray's processes find it gone); the last run finishes the sweep without
    training a finished model again, with one MLflow run per model and nothing left RUNNING."""
    out = tmp_path
    for instant in (at_once, after(0.3), after(1), after(2), tables_at_least("mlflow.db", whole_store_tables // 2)):
        kill_when(wbsweep_run(out), out, instant)

    proc = start(wbsweep_run(out), output=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list((out / "results").glob("*.parquet"))) < 4:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    before = {k: v for k, v in trained(out).items()
              if (out / "runs" / k[0] / k[1] / "metrics.json").stat().st_mtime < killed_at}
    assert before, "no model had finished before the kill"
    time.sleep(2)  # let Ray's processes notice that their driver is gone
    status = wbsweep_here(capsys, "status", "--out", str(out))
    assert status.returncode == 0 and "interrupted" in status.stdout, status.stdout + status.stderr

    proc = start(wbsweep_run(out))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    df = pd.read_parquet(out / "results")
    assert len(df) == 24 and not df.duplicated(["method", "la", "seed"]).any()
    assert_same_rows(out, smoke_reference, same_search=False)  # the search was cut: it may choose otherwise
    assert leftovers(out) == []
    after_ = trained(out)
    for model, attempts in before.items():  # finished work was not trained again
        assert after_[model] == attempts == 1, model
    children = mlflow_children(out)
    keys = [(r.data.tags["wbsweep.config_hash"], r.data.tags["wbsweep.seed"]) for r in children]
    assert len(keys) == len(set(keys)), "a model got two MLflow runs"
    # one FINISHED run per trained model; a tune trial in flight at the kill that the resumed study
    # did not propose again is KILLED with the reason, not left RUNNING
    assert len([r for r in children if r.info.status == "FINISHED"]) == len(after_)
    for r in children:
        assert r.info.status == "FINISHED" or (r.info.status == "KILLED" and "interrupted" in
                                               r.data.tags.get("wbsweep.error", "")), r.info
    # a run KILLED by the kill and re-attached by the resume ends FINISHED without the stale reason
    assert not [r.info.run_name for r in mlflow_runs(out)
                if r.info.status == "FINISHED" and "wbsweep.error" in r.data.tags]
    status = wbsweep_here(capsys, "status", "--out", str(out)).stdout
    assert "finished" in status
    assert_nothing_left_open(out, status)
