"""What several test modules share: running the command line, Ray clusters of a test's own, reading a
results folder. Test modules import from here (``from helpers import ...``), never from each other;
pytest's fixtures (the data fakes, the session's shared Ray cluster, the reference smoke sweep) are in
tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

#: The command line, as `wbsweep` runs it (the console script is ``orchestrator.cli:entry``); through
#: this interpreter, so that it imports the tree under test.
CLI = [sys.executable, "-m", "orchestrator.cli"]


# --- the command line ---------------------------------------------------------------------------------


def wbsweep(*args: str, env: dict | None = None, cwd: Path | str | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """``wbsweep ARGS`` in a process of its own, its output captured as text. ``env`` replaces the
    environment (None: this one's)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def wbsweep_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """``wbsweep ARGS`` in this process (``orchestrator.cli.main``), its output taken from pytest's
    ``capsys``: for the commands that read a results folder (report, status), seconds faster than a
    process of their own (no interpreter start, torch and MLflow already imported). The result reads
    like :func:`wbsweep`'s. The exit path of a real process (``entry``) is tests/test_cli.py's."""
    from orchestrator.cli import main

    capsys.readouterr()  # what the test printed before is not this command's output
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([*CLI, *args], code, captured.out, captured.err)


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The command failed as a user's mistake should: exit ``code``, no traceback, one line on stderr
    that starts with ``wbsweep: error: ``. Returns that line."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("wbsweep: error: "), proc.stderr[-3000:]
    return lines[0]


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """:func:`one_error_line` with exit status 2, and each of ``words`` in that line."""
    line = one_error_line(proc)
    for w in words:
        assert w in line, (w, line)


# --- Ray clusters of a test's own -----------------------------------------------------------------------


@dataclass(frozen=True)
class RayCluster:
    """A running Ray cluster: ``wbsweep run ... --address ADDRESS`` joins it, with ``env`` (its token
    authentication) as the command's environment."""

    address: str
    env: dict[str, str]
    temp: Path  # its session folder: every process of the cluster names it (kill_tree's pattern)


def kill_tree(pattern: str) -> None:
    """SIGKILL the processes whose command line contains ``pattern`` (a test cluster's own temp
    folder or node id), and every process under them. Never `ray stop`: that stops every Ray
    cluster on the machine, the session's shared one and other users' included."""
    parent, cmdline = {}, {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                cmdline[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    doomed = {pid for pid, cmd in cmdline.items() if pattern in cmd}
    grew = True
    while grew:
        children = {pid for pid, ppid in parent.items() if ppid in doomed} - doomed
        grew = bool(children)
        doomed |= children
    for pid in doomed:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


def long_trials_spec(name: str, epochs: int, fuse: str = "off") -> str:
    """A spec whose trials last seconds (``epochs`` of the digits MLP, a checkpoint every epoch): a
    tune stage (real Optuna, two trials) and repeats over three seeds, ``fuse`` models per trial at
    most. With sub-second trials (the smoke preset) every trial can run, one after another, on the
    first node's reused trial actor before a second actor has started (seen on a loaded 2-core CI machine)."""
    return f"""\
name: {name}
methods:
  - {{method: naive, la: [none]}}
  - {{method: wd, la: [none, mult]}}
presets:
  cpu:
    train: {{dataset: digits-lt, model: mlp3, width: 64, epochs: {epochs}, checkpoint_seconds: 0}}
    hyper: {{wd: 5.0e-3}}
    search: {{wd: {{loguniform: [1.0e-4, 1.0e-2]}}}}
    trials: 2
    seeds: [0, 1, 2]
    resources: {{fuse: {fuse}}}
"""


# --- a results folder ------------------------------------------------------------------------------------

#: What identifies a row of the results (one model of one method, LA and seed).
KEY = ["spec", "dataset", "model", "method", "la", "seed"]
#: What two sweeps of the same spec must agree on, row by row.
COMPARED = ["acc_many", "acc_medium", "acc_few", "acc_avg", "fdr_train", "fdr_test", "tau", "gamma", "config_hash"]


def trained(out: Path) -> dict[tuple[str, str], int]:
    """The finished models of a results folder, (config hash, "seedK") -> number of training attempts."""
    return {(p.parent.parent.name, p.parent.name): len((p.parent / "attempts.log").read_text().splitlines())
            for p in (out / "runs").glob("*/seed*/metrics.json")}


def mlflow_runs(out: Path, experiment: str = "table4") -> list:
    """Every MLflow run of an experiment in the folder's store: a parent per stage, a child per model."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=2000)


def mlflow_children(out: Path, experiment: str = "table4") -> list:
    """The model runs (not the reference runs that list a reused model under a later stage too)."""
    return [r for r in mlflow_runs(out, experiment) if "mlflow.parentRunId" in r.data.tags
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


def digest(folder: Path) -> dict[str, str]:
    """The files in a folder, name -> SHA-256: to show that nothing changed them."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*"))}


def sorted_rows(out: Path) -> pd.DataFrame:
    """The results of a folder, sorted by :data:`KEY`."""
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
    df = sorted_rows(out)
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


# --- a sweep's context as the watchdog sees it, and a results folder's lock ----------------------------


class FakeSweep:
    """What the watchdog reads of a sweep's context (orchestrator/sweep/context.py), and the status
    states it writes."""

    def __init__(self, cpus=1.0, gpus=0.0, autoscaling=False):
        from types import SimpleNamespace

        self.cpus, self.gpus, self.autoscaling = cpus, gpus, autoscaling
        self.states: list[tuple[str, str | None]] = []
        self.status = SimpleNamespace(write=self.write)
        self.lock = None  # the results folder's lock (orchestrator/record/folder_lock.py): none here

    def write(self, state: str | None = None, reason: str | None = None) -> None:
        self.states.append((state or "running", reason))


def trials(*statuses: str) -> list:
    """Ray Tune trials as the watchdog reads them: their status only."""
    from types import SimpleNamespace

    return [SimpleNamespace(status=s) for s in statuses]


def write_lock(folder: Path, **fields) -> dict:
    """A results folder's lock file as another command would have left it (orchestrator/record/folder_lock.py)."""
    import socket
    import time

    from orchestrator.record.folder_lock import LOCK_NAME, process_start

    now = time.time()
    doc = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()), "boot": None,
           "command": "wbsweep run other", "started": now - 100, "heartbeat": now, "heartbeat_s": 15.0,
           "token": "someone-else", **fields}
    (folder / LOCK_NAME).write_text(json.dumps(doc))
    return doc
