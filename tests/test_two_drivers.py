"""Two drivers on one results folder: the second is refused in one line naming the first, which
finishes alone (no model trained or logged twice, no Optuna trial of the first failed by the
second); a driver killed with SIGKILL leaves a lock the next run takes over in one line; a lock
of another machine is refused while its heartbeat is fresh and taken over once it is stale; the
read-only commands work meanwhile (orchestrator/record/folder_lock.py, docs/resilience.md "One
folder, one owner"). Real `wbsweep` processes on a tiny spec with a tune stage."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import CLI, wbsweep, write_lock

from orchestrator.record.folder_lock import LOCK_NAME

pytestmark = pytest.mark.slow

SPEC = """name: owner
methods:
  - {method: wd, la: [none]}
  - {method: wb, la: [none]}
presets:
  p:
    train: {dataset: digits-lt, model: mlp3, epochs: 2, lr: 0.05, width: 16, stage2_epochs: 1}
    hyper: {wd: 5.0e-3, stage2_wd: 0.1}
    search:
      wd: {loguniform: [1.0e-4, 5.0e-2]}
    trials: 2
    seeds: [0, 1]
"""


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("wbsweep: error: ") and "Traceback" not in err, err[-3000:]
    return lines[0]


def model_runs(out: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("owner")
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if "mlflow.parentRunId" in r.data.tags and "wbsweep.config_hash" in r.data.tags
            and r.data.tags.get("wbsweep.kind") != "reference"]


def optuna_states(out: Path) -> list[str]:
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
    return [t.state.name for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("spec") / "owner.yaml"
    path.write_text(SPEC)
    return str(path)


@pytest.fixture(scope="module")
def raced(spec, tmp_path_factory) -> tuple[Path, list[subprocess.Popen], list[tuple[str, str]]]:
    """The same `wbsweep run` started twice at once on one folder."""
    out = tmp_path_factory.mktemp("raced")
    procs = [start(["run", spec, "--out", str(out)]) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    return out, procs, outputs


def test_two_drivers_at_once_one_is_refused_naming_the_other_which_finishes_alone(raced):
    out, procs, outputs = raced
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, err[-2000:]) for p, (_, err) in zip(procs, outputs, strict=True)]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    line = one_error_line(outputs[loser][1])
    assert f"{out} is in use by `wbsweep run " in line and f"(pid {procs[winner].pid} on {socket.gethostname()}" in line
    assert "wait for it to end" in line
    runs = model_runs(out)
    keys = [(r.data.tags["wbsweep.config_hash"], r.data.tags["wbsweep.seed"]) for r in runs]
    assert keys and len(keys) == len(set(keys)), "a model got two MLflow runs"
    assert all(r.info.status == "FINISHED" for r in runs)
    states = optuna_states(out)
    assert states and set(states) == {"COMPLETE"}, states  # the second driver failed none of the first's trials
    assert not (out / LOCK_NAME).exists()  # given back at the end


def test_a_lock_of_another_machine_is_refused_while_fresh_and_taken_over_once_stale(raced, spec):
    out, _, _ = raced
    write_lock(out, host="another-node", pid=4242, command="wbsweep run owner.yaml --out shared", boot=None)
    proc = wbsweep("run", spec, "--out", str(out), timeout=120)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "is in use by `wbsweep run owner.yaml --out shared` (pid 4242 on another-node" in line
    analyze = wbsweep("analyze", "--out", str(out), timeout=120)
    assert analyze.returncode == 2 and "pid 4242 on another-node" in one_error_line(analyze.stderr)
    # the read-only commands work meanwhile: status names the holder; report prints, and logs nothing
    status = wbsweep("status", "--out", str(out), timeout=120)
    assert status.returncode == 0 and "in use by `wbsweep run owner.yaml --out shared` (pid 4242" in status.stdout
    before = {r.info.run_id: r.info.end_time for r in model_runs(out)}
    report = wbsweep("report", spec, "--out", str(out), timeout=300)
    assert report.returncode == 0 and "WD" in report.stdout and "WB" in report.stdout, report.stderr[-2000:]
    assert "the report not logged to MLflow: " in report.stderr and "pid 4242 on another-node" in report.stderr
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == 4242  # untouched

    write_lock(out, host="another-node", pid=4242, command="wbsweep run owner.yaml --out shared", boot=None,
               heartbeat=time.time() - 3600)  # its machine went away an hour ago
    proc = wbsweep("run", spec, "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    took = [ln for ln in proc.stderr.splitlines() if ln.startswith("took over")]
    assert len(took) == 1 and "pid 4242 on another-node" in took[0] and "its heartbeat is 60 min old" in took[0]
    assert {r.info.run_id: r.info.end_time for r in model_runs(out)}.keys() == before.keys()  # all reused
    assert not (out / LOCK_NAME).exists()


def test_a_driver_killed_mid_sweep_leaves_a_lock_the_next_run_takes_over(spec, tmp_path):
    proc = start(["run", spec, "--out", str(tmp_path)])
    deadline = time.monotonic() + 300
    while proc.poll() is None and not list((tmp_path / "trials").glob("*.parquet")):
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray cluster, with no way to clean up
    proc.communicate()
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["pid"] == proc.pid
    again = wbsweep("run", spec, "--out", str(tmp_path), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    took = [ln for ln in again.stderr.splitlines() if ln.startswith("took over")]
    assert len(took) == 1 and f"(pid {proc.pid} on" in took[0] and took[0].endswith("its process is gone")
    runs = model_runs(tmp_path)
    keys = [(r.data.tags["wbsweep.config_hash"], r.data.tags["wbsweep.seed"]) for r in runs]
    assert len(keys) == len(set(keys))
    assert not (tmp_path / LOCK_NAME).exists()
