"""Nothing lost: crashed trials, a driver killed with SIGKILL, and resumed sweeps — all with a real
local Ray cluster, real Optuna studies, a real MLflow store and real Parquet files.

The reference is an uninterrupted smoke sweep; an interrupted one must end with the same rows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

KEY = ["spec", "dataset", "model", "method", "la", "seed"]
COMPARED = ["acc_many", "acc_medium", "acc_few", "acc_avg", "fdr_train", "fdr_test", "tau", "gamma", "config_hash"]


def run_cmd(out: Path, env: dict | None = None, stderr=subprocess.PIPE, fuse: str = "auto") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "table4", "--preset", "smoke",
                             "--out", str(out), "--fuse", fuse], stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def trained(out: Path) -> dict[tuple[str, str], int]:
    """Finished models -> number of training attempts."""
    return {(p.parent.parent.name, p.parent.name): len((p.parent / "attempts.log").read_text().splitlines())
            for p in (out / "runs").glob("*/seed*/metrics.json")}


def mlflow_runs(out: Path) -> list:
    """Every MLflow run of the sweep: a parent per stage, a child per model."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("table4")
    return client.search_runs([exp.experiment_id], max_results=2000)


def mlflow_children(out: Path) -> list:
    """The model runs (not the reference runs that list a reused model under a later stage too)."""
    return [r for r in mlflow_runs(out) if "mlflow.parentRunId" in r.data.tags
            and r.data.tags.get("wbsweep.kind") != "reference"]


def running_optuna_trials(out: Path) -> list:
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
    return [t for s in storage.get_all_studies()
            for t in storage.get_all_trials(s._study_id, states=(TrialState.RUNNING, TrialState.WAITING))]


def assert_nothing_left_open(out: Path, status_text: str) -> None:
    """After the driver stopped: no MLflow run (model or stage) RUNNING, no Optuna trial RUNNING
    (or enqueued: a resume would end it anyway), no trial counted as running or waiting."""
    runs = mlflow_runs(out)
    assert runs and not [(r.info.run_name, r.data.tags.get("mlflow.parentRunId")) for r in runs
                         if r.info.status == "RUNNING"]
    assert not running_optuna_trials(out)
    (status,) = (out / "status").glob("*.json")
    trials = json.loads(status.read_text())["trials"]
    assert trials["running"] == trials["pending"] == 0, trials
    assert not re.search(r"\b[1-9]\d* running", status_text), status_text


@pytest.fixture(scope="module")
def reference(smoke_sweep) -> pd.DataFrame:
    """The rows of the uninterrupted smoke sweep (shared with tests/test_integration.py)."""
    out, _ = smoke_sweep
    return pd.read_parquet(out / "results").sort_values(KEY).reset_index(drop=True)


def assert_same_rows(out: Path, reference: pd.DataFrame, same_search: bool = True) -> None:
    """The same rows as the uninterrupted sweep. When the driver was killed mid-search
    (``same_search=False``) the resumed Optuna study proposes its remaining points with another
    sampler seed (so as not to repeat finished ones) and may choose another config: then the keys
    and counts must match, and the values wherever the config is the same."""
    # rtol: a model trained fused (trainables/fused.py) rounds as the group it trains in does (batched
    # products sum in another order than single ones; alone, or grouped otherwise by a resumed sweep):
    # accuracies stay equal (one flipped test prediction moves acc_avg by > 1e-3 relative), FDR (a ratio
    # of scatter matrices) moves by up to ~1e-4 relative (measured: 7.5e-5 fused vs alone)
    rtol = 1e-3
    df = pd.read_parquet(out / "results").sort_values(KEY).reset_index(drop=True)
    assert not df.duplicated(KEY).any()
    assert len(df) == len(reference)
    assert df[KEY].equals(reference[KEY])
    if same_search:
        pd.testing.assert_frame_equal(df[KEY + COMPARED], reference[KEY + COMPARED], check_exact=False, rtol=rtol)
    else:
        same = df["config_hash"] == reference["config_hash"]
        assert same.sum() >= len(df) // 2  # untuned methods and unchanged choices
        pd.testing.assert_frame_equal(df.loc[same, KEY + COMPARED], reference.loc[same, KEY + COMPARED],
                                      check_exact=False, rtol=rtol)


def test_crashed_trials_are_retried_from_their_checkpoint(tmp_path, reference, smoke_sweep):
    """Every seed-1 run's process dies (os._exit) at the end of its first epoch, once; Ray retries it
    and the trainer resumes from the checkpoint it wrote at that epoch (seed 0: the tune stages'
    trials, not crashed, to keep the test short). One model per trial (--fuse off; the S3 test of
    tests/test_storage.py crashes fused groups): so its rows, against the reference sweep's (fused,
    the default), also show that fusing changes no result beyond float32 rounding (the same models,
    choices and accuracies; FDR within assert_same_rows' rtol), and each model has its MLflow run,
    tagged as fused in the reference only."""
    code, err = finish(run_cmd(tmp_path, {"WBSWEEP_INJECT_CRASH": "1", "WBSWEEP_INJECT_CRASH_SEEDS": "1"},
                               fuse="off"))
    assert code == 0, err[-3000:]
    markers = list((tmp_path / "runs").glob("*/seed*/.crash-injected"))
    assert len(markers) >= 5 and all(m.parent.name == "seed1" for m in markers)  # every seed-1 model crashed
    attempts = trained(tmp_path)
    assert all(n == (2 if s == "seed1" else 1) for (h, s), n in attempts.items()), attempts
    assert_same_rows(tmp_path, reference)
    children, fused = mlflow_children(tmp_path), mlflow_children(smoke_sweep[0])
    assert all(r.info.status == "FINISHED" for r in children)
    assert len(children) == len(fused) == len(attempts)
    assert not any("wbsweep.fused_trial" in r.data.tags for r in children)
    tagged = [r for r in fused if "wbsweep.fused_trial" in r.data.tags]
    assert tagged  # WB's second stages too, when their parents finish together (tests/test_fused_stage2.py)
    (fingerprint,) = pd.read_parquet(tmp_path / "results")["data_fingerprint"].unique()
    for r in children:  # the split as the run's dataset input, once (a retry re-attaches the run)
        (used,) = r.inputs.dataset_inputs
        assert used.dataset.digest == fingerprint and used.dataset.name.startswith("digits-lt")
        assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "training")]


def test_sigterm_stops_the_sweep_like_ctrl_c(tmp_path):
    """kill (SIGTERM, as a job scheduler stops a job) is a graceful stop: the one-line message, the
    status 'interrupted', no abort dump from the libraries' own signal handlers; and what the sweep
    started ends: the stopped trials' MLflow runs KILLED with the reason, the stages' runs ended, the
    Optuna trials in flight failed (a resume proposes others), no trial counted as running. One
    model per trial (--fuse off): fused groups of sub-second models finish in bursts, and the stop
    must find some in flight."""
    proc = run_cmd(tmp_path, fuse="off")
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "trials").glob("*.parquet")):
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout=120)
    assert code == 130 and "interrupted; run the same command again to resume" in err, err[-3000:]
    assert "SIGTERM received" not in err
    status = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert "interrupted" in status.stdout, status.stdout
    assert_nothing_left_open(tmp_path, status.stdout)
    stopped = [r for r in mlflow_runs(tmp_path) if r.info.status == "KILLED"]
    assert stopped, "no run was in flight at the stop"
    assert all(r.data.tags.get("wbsweep.error", "").startswith("interrupted") for r in stopped)


def test_a_locked_tracking_store_delays_the_logging_not_the_sweep(tmp_path, reference):
    """Another process holds mlflow.db locked (a second command, `mlflow gc`, a database browser, a
    backup) for longer than MLflow waits (its SQLite busy timeout, 20 s) while trials run: the sweep
    says so in one line, goes on, and catches the logging up once the lock is gone."""
    out, err_file = tmp_path / "out", tmp_path / "stderr.txt"
    with open(err_file, "w") as err_fh:
        proc = run_cmd(out, {"WBSWEEP_TRACKING_RETRY_S": "1"}, stderr=err_fh)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((out / "runs").glob("*/seed*/mlflow_run_id")):
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before the store could be locked"
    lock = sqlite3.connect(out / "mlflow.db", timeout=60, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # no reader or writer gets in
    try:
        deadline = time.time() + 120
        while (time.time() < deadline and proc.poll() is None
               and "tracking store unavailable" not in err_file.read_text()):
            time.sleep(0.2)
        time.sleep(2)  # the calls made meanwhile are deferred without waiting
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    code = proc.wait(timeout=600)
    err = err_file.read_text()
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "tracking store unavailable" in line]
    assert len(warnings) == 1 and "database is locked" in warnings[0], err[-3000:]
    assert "available again" in err and "could not be made" not in err and "Traceback" not in err, err[-3000:]
    assert_same_rows(out, reference)
    # every model has its run, FINISHED with its metrics and files; every stage's run is FINISHED
    runs = mlflow_runs(out)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    children = mlflow_children(out)
    assert {(r.data.tags["wbsweep.config_hash"], f"seed{r.data.tags['wbsweep.seed']}") for r in children} \
        == set(trained(out))
    assert all("fdr_test" in r.data.metrics and "val_acc" in r.data.metrics for r in children)
