"""Nothing lost: crashed trials, a driver stopped with SIGTERM, a locked tracking store — all with a
real Ray cluster, real Optuna studies, a real MLflow store and real Parquet files. The crash test
starts a local cluster of its own (its trials must get the crash injection's environment); the
others stop or slow the driver only, and join the session's shared cluster (tests/conftest.py).
A driver killed with SIGKILL at every instant: tests/test_kill_instants.py.

The reference is an uninterrupted smoke sweep; an interrupted one must end with the same rows.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import (
    CLI,
    RayCluster,
    assert_nothing_left_open,
    assert_same_rows,
    mlflow_children,
    mlflow_runs,
    trained,
    wbsweep_here,
)

pytestmark = pytest.mark.slow


def run_cmd(out: Path, env: dict | None = None, stderr=subprocess.PIPE, fuse: str = "auto",
            cluster: RayCluster | None = None) -> subprocess.Popen:
    """`wbsweep run table4 --preset smoke` in a process group of its own, on a local Ray cluster of
    its own, or on ``cluster`` (its trials then do not get ``env``: only the command does)."""
    address = ["--address", cluster.address] if cluster else []
    return subprocess.Popen([*CLI, "run", "table4", "--preset", "smoke", "--out", str(out), "--fuse", fuse, *address],
                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**(cluster.env if cluster else os.environ), **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_crashed_trials_are_retried_from_their_checkpoint(tmp_path, smoke_reference, smoke_sweep):
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
    assert_same_rows(tmp_path, smoke_reference)
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


def test_sigterm_stops_the_sweep_like_ctrl_c(tmp_path, capsys, ray_cluster):
    """kill (SIGTERM, as a job scheduler stops a job) is a graceful stop: the one-line message, the
    status 'interrupted', no abort dump from the libraries' own signal handlers; and what the sweep
    started ends: the stopped trials' MLflow runs KILLED with the reason, the stages' runs ended, the
    Optuna trials in flight failed (a resume proposes others), no trial counted as running. One
    model per trial (--fuse off): fused groups of sub-second models finish in bursts, and the stop
    must find some in flight."""
    proc = run_cmd(tmp_path, fuse="off", cluster=ray_cluster)  # the driver is stopped, not Ray
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "trials").glob("*.parquet")):
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout=120)
    assert code == 130 and "interrupted; run the same command again to resume" in err, err[-3000:]
    assert "SIGTERM received" not in err
    status = wbsweep_here(capsys, "status", "--out", str(tmp_path))
    assert "interrupted" in status.stdout, status.stdout
    assert_nothing_left_open(tmp_path, status.stdout)
    stopped = [r for r in mlflow_runs(tmp_path) if r.info.status == "KILLED"]
    assert stopped, "no run was in flight at the stop"
    assert all(r.data.tags.get("wbsweep.error", "").startswith("interrupted") for r in stopped)


def test_a_locked_tracking_store_delays_the_logging_not_the_sweep(tmp_path, smoke_reference, ray_cluster):
    """Another process holds mlflow.db locked (a second command, `mlflow gc`, a database browser, a
    backup) for longer than MLflow waits (its SQLite busy timeout, 20 s) while trials run: the sweep
    says so in one line, goes on, and catches the logging up once the lock is gone."""
    out, err_file = tmp_path / "out", tmp_path / "stderr.txt"
    with open(err_file, "w") as err_fh:
        proc = run_cmd(out, {"WBSWEEP_TRACKING_RETRY_S": "1"}, stderr=err_fh, cluster=ray_cluster)  # the driver's
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
    assert_same_rows(out, smoke_reference)
    # every model has its run, FINISHED with its metrics and files; every stage's run is FINISHED
    runs = mlflow_runs(out)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    children = mlflow_children(out)
    assert {(r.data.tags["wbsweep.config_hash"], f"seed{r.data.tags['wbsweep.seed']}") for r in children} \
        == set(trained(out))
    assert all("fdr_test" in r.data.metrics and "val_acc" in r.data.metrics for r in children)
