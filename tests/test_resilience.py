"""Nothing lost: crashed trials, a driver killed with SIGKILL, and resumed sweeps — all with a real
local Ray cluster, real Optuna studies, a real MLflow store and real Parquet files.

The reference is an uninterrupted smoke sweep; an interrupted one must end with the same rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

KEY = ["spec", "dataset", "model", "method", "la", "seed"]
COMPARED = ["acc_many", "acc_medium", "acc_few", "acc_avg", "fdr_train", "fdr_test", "tau", "gamma", "config_hash"]


def run_cmd(out: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "table4", "--preset", "smoke",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def trained(out: Path) -> dict[tuple[str, str], int]:
    """Finished models -> number of training attempts."""
    return {(p.parent.parent.name, p.parent.name): len((p.parent / "attempts.log").read_text().splitlines())
            for p in (out / "runs").glob("*/seed*/metrics.json")}


def mlflow_children(out: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("table4")
    return [r for r in client.search_runs([exp.experiment_id], max_results=2000) if "mlflow.parentRunId" in r.data.tags]


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
    df = pd.read_parquet(out / "results").sort_values(KEY).reset_index(drop=True)
    assert not df.duplicated(KEY).any()
    assert len(df) == len(reference)
    assert df[KEY].equals(reference[KEY])
    if same_search:
        pd.testing.assert_frame_equal(df[KEY + COMPARED], reference[KEY + COMPARED], check_exact=False, rtol=1e-9)
    else:
        same = df["config_hash"] == reference["config_hash"]
        assert same.sum() >= len(df) // 2  # untuned methods and unchanged choices
        pd.testing.assert_frame_equal(df.loc[same, KEY + COMPARED], reference.loc[same, KEY + COMPARED],
                                      check_exact=False, rtol=1e-9)


def test_crashed_trials_are_retried_from_their_checkpoint(tmp_path, reference):
    # every seed-1 run's process dies (os._exit) at the end of its first epoch, once; Ray retries it
    # and the trainer resumes from the checkpoint it wrote at that epoch (seed 0: the tune stages'
    # trials, not crashed, to keep the test short)
    code, err = finish(run_cmd(tmp_path, {"WBSWEEP_INJECT_CRASH": "1", "WBSWEEP_INJECT_CRASH_SEEDS": "1"}))
    assert code == 0, err[-3000:]
    markers = list((tmp_path / "runs").glob("*/seed*/.crash-injected"))
    assert len(markers) >= 5 and all(m.parent.name == "seed1" for m in markers)  # every seed-1 model crashed
    attempts = trained(tmp_path)
    assert all(n == (2 if s == "seed1" else 1) for (h, s), n in attempts.items()), attempts
    assert_same_rows(tmp_path, reference)
    assert all(r.info.status == "FINISHED" for r in mlflow_children(tmp_path))


def test_driver_killed_mid_sweep_then_rerun(tmp_path, reference):
    proc = run_cmd(tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((tmp_path / "results").glob("*.parquet"))) < 4:
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    before = {k: v for k, v in trained(tmp_path).items()
              if (tmp_path / "runs" / k[0] / k[1] / "metrics.json").stat().st_mtime < killed_at}
    assert before, "no model had finished before the kill"
    time.sleep(2)  # let Ray's processes notice that their driver is gone

    status = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert status.returncode == 0 and "interrupted" in status.stdout, status.stdout + status.stderr

    code, err = finish(run_cmd(tmp_path))
    assert code == 0, err[-3000:]
    assert_same_rows(tmp_path, reference, same_search=False)
    after = trained(tmp_path)
    for model, attempts in before.items():  # finished work was not trained again
        assert after[model] == attempts == 1, model
    children = mlflow_children(tmp_path)
    keys = [(r.data.tags["wbsweep.config_hash"], r.data.tags["wbsweep.seed"]) for r in children]
    assert len(keys) == len(set(keys)), "a model got two MLflow runs"
    # one FINISHED run per trained model; a tune trial in flight at the kill that the resumed study
    # did not propose again is KILLED with the reason, not left RUNNING
    assert len([r for r in children if r.info.status == "FINISHED"]) == len(after)
    for r in children:
        assert r.info.status == "FINISHED" or (r.info.status == "KILLED" and "interrupted" in
                                               r.data.tags.get("wbsweep.error", "")), r.info
    assert "finished" in subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--out",
                                         str(tmp_path)], capture_output=True, text=True).stdout


def test_sigterm_stops_the_sweep_like_ctrl_c(tmp_path):
    """kill (SIGTERM, as a job scheduler stops a job) is a graceful stop: the one-line message, the
    status 'interrupted', no abort dump from the libraries' own signal handlers."""
    proc = run_cmd(tmp_path)
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
