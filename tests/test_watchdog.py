"""A sweep never hangs on a dead backend, and what stops Ray or the command is one line with a
known exit status: the watchdog (orchestrator/sweep/watchdog.py), the heartbeat `wbsweep status` checks,
Ray's start-up traps (orchestrator/sweep/ray_start.py), and errors that exit 2 every time (cli.entry)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import CLI, FakeSweep, kill_tree, one_error_line, trials, wbsweep

from orchestrator.sweep.status import status_text
from orchestrator.sweep.watchdog import Limits, Node, SweepStopped, Watchdog

# --- the watchdog's decisions, on a clock and node lists of the test's choosing ------------------


def watchdog(sweep, nodes, refused=(), **limits) -> tuple[Watchdog, list[float]]:
    """A watchdog whose cluster is ``nodes`` ("me": the driver's) and whose clock the test moves;
    ``refused``: the HOST:PORTs where nothing listens."""
    now = [1000.0]
    lim = {"stall_s": 1800.0, "unschedulable_s": 600.0, "check_s": 5.0, "heartbeat_s": 15.0, **limits}
    dog = Watchdog(sweep, limits=Limits(**lim), nodes=lambda: nodes, own_node="me",
                   clock=lambda: now[0], refuses=lambda host, port: f"{host}:{port}" in refused)
    return dog, now


ME = Node("me", True, {"CPU": 4.0, "GPU": 0.0}, "10.0.0.1", 4000)
OTHER = Node("other", True, {"CPU": 8.0, "GPU": 1.0})


def test_a_dead_node_of_the_driver_or_no_live_node_stops_the_sweep_at_the_first_check():
    for nodes, words in (([Node("me", False, {}), OTHER], "this machine is dead"),
                         ([Node("x", False, {})], "no live node")):
        sweep = FakeSweep()
        dog, _ = watchdog(sweep, nodes)
        with pytest.raises(SweepStopped, match=words) as err:
            dog.on_step_end(iteration=1, trials=trials("PENDING"))
        assert err.value.exit_code == 3 and "run the same command again to resume" in str(err.value)
        assert sweep.states and sweep.states[-1][0] == "stopped" and words in sweep.states[-1][1]
    dog, _ = watchdog(FakeSweep(), [ME, Node("gone", False, {})])  # a worker lost: Tune retries elsewhere
    dog.on_step_end(iteration=1, trials=trials("PENDING"))


def test_the_drivers_raylet_refusing_twice_in_a_row_is_a_dead_node_before_the_gcs_says_so():
    dog, now = watchdog(FakeSweep(), [ME, OTHER], refused={"10.0.0.1:4000"})
    dog.on_step_end(iteration=1, trials=trials("RUNNING"))  # once: could be a moment's hiccup
    now[0] += 5
    with pytest.raises(SweepStopped, match="the Ray node of this machine is dead"):
        dog.on_step_end(iteration=2, trials=trials("RUNNING"))
    from orchestrator.sweep.watchdog import port_refuses

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert not port_refuses("127.0.0.1", port)
    assert port_refuses("127.0.0.1", port)  # closed: nothing listens there any more


def test_no_trial_event_for_the_stall_time_stops_it_and_any_event_restarts_the_clock():
    dog, now = watchdog(FakeSweep(), [ME], stall_s=60.0)
    now[0] += 59
    dog.on_step_end(iteration=1, trials=trials("RUNNING"))
    now[0] += 50
    dog.on_trial_result(iteration=2, trials=[], trial=None, result={})  # an epoch reported
    now[0] += 55
    dog.on_step_end(iteration=3, trials=trials("RUNNING"))
    now[0] += 10
    with pytest.raises(SweepStopped, match="no trial started, reported or ended for 0:01:05"):
        dog.on_step_end(iteration=4, trials=trials("RUNNING"))
    off, now = watchdog(FakeSweep(), [ME], stall_s=0.0)
    now[0] += 10**6
    off.on_step_end(iteration=1, trials=trials("RUNNING"))


def test_trials_no_live_node_can_hold_stop_it_only_on_a_fixed_cluster_and_after_the_limit():
    gpu_sweep = FakeSweep(cpus=1, gpus=1)
    dog, now = watchdog(gpu_sweep, [ME], unschedulable_s=100.0)
    dog.on_step_end(iteration=1, trials=trials("PENDING", "PENDING"))
    now[0] += 99
    dog.on_step_end(iteration=2, trials=trials("PENDING", "PENDING"))
    now[0] += 6  # the next check (every check_s = 5 s)
    with pytest.raises(SweepStopped, match=r"0:01:45 2 trial\(s\) waited for a node with 1 CPU \+ 1 GPU.*4 CPU, 0"):
        dog.on_step_end(iteration=3, trials=trials("PENDING", "PENDING"))
    # a node that holds one, a trial that runs, or an autoscaler: a wait, not a dead end
    for nodes, sweep, states in (([ME, OTHER], FakeSweep(cpus=1, gpus=1), ("PENDING",)),
                                 ([ME], FakeSweep(cpus=1, gpus=1), ("PENDING", "RUNNING")),
                                 ([ME], FakeSweep(cpus=1, gpus=1, autoscaling=True), ("PENDING",))):
        dog, now = watchdog(sweep, nodes, unschedulable_s=100.0)
        for i in range(3):
            dog.on_step_end(iteration=i, trials=trials(*states))
            now[0] += 200


def test_the_heartbeat_rewrites_the_status_between_events():
    sweep = FakeSweep()
    dog, now = watchdog(sweep, [ME], heartbeat_s=15.0)
    for _ in range(10):
        now[0] += 4
        dog.on_step_end(iteration=1, trials=trials("RUNNING"))
    assert sweep.states == [("running", None)] * 2  # at 16 s and 32 s of 40


# --- what `wbsweep status` makes of the heartbeat --------------------------------------------------


def status_file(out: Path, **fields) -> None:
    doc = {"spec": "table4", "preset": "smoke", "variant": None, "state": "running", "pid": os.getpid(),
           "host": socket.gethostname(), "updated": time.time(), "started": time.time(), "heartbeat_s": 15,
           "trials": {"total": 4, "done": 1, "skipped": 0, "running": 1, "failed": 0},
           "stages": {"repeat wd": "running"}, "failures": [], **fields}
    (out / "status").mkdir(exist_ok=True)
    (out / "status" / "table4-smoke.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("host", ["here", "elsewhere"])
def test_a_running_status_without_a_recent_heartbeat_is_not_responding(tmp_path, host):
    # a live pid (this test's) that no longer beats: a hung driver; on another host: one we cannot check
    status_file(tmp_path, updated=time.time() - 600,
                host=socket.gethostname() if host == "here" else "some-other-node")
    first = status_text(tmp_path).splitlines()[0]
    assert ": not responding (last heartbeat 10 min ago" in first and "run the same command again" in first
    status_file(tmp_path, updated=time.time() - 60)  # within the grace: running
    assert ": running, updated 60 s ago" in status_text(tmp_path)
    status_file(tmp_path, updated=time.time() - 3600, heartbeat_s=None)  # an older driver kept no heartbeat
    assert ": running, updated 3600 s ago" in status_text(tmp_path)


def test_a_stopped_sweep_shows_why(tmp_path):
    status_file(tmp_path, state="stopped", reason="the Ray cluster is gone: it has no live node")
    assert "stopped: the Ray cluster is gone: it has no live node (run the same command again to resume)" in \
        status_text(tmp_path)


# --- Ray's start-up traps, through the real command ----------------------------------------------


def test_a_tmpdir_too_long_for_rays_sockets_is_one_line(tmp_path):
    long_tmp = Path("/tmp") / ("wbsweep-long-tmpdir-" + "x" * 70)
    long_tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}  # Ray then reads TMPDIR
    try:
        proc = wbsweep("run", "table4", "--preset", "smoke", "--out", str(tmp_path / "o"),
                       env={**env, "TMPDIR": str(long_tmp)}, timeout=120)
    finally:
        shutil.rmtree(long_tmp, ignore_errors=True)
    line = one_error_line(proc)
    assert "107-byte limit" in line and "RAY_TMPDIR=/tmp" in line and "TMPDIR=" in line


def test_address_auto_with_a_stale_session_file_is_one_line_not_minutes_of_retries(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="wbst", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # `ray start` killed -9 long ago
        started = time.time()
        proc = wbsweep("run", "table4", "--preset", "smoke", "--out", str(tmp_path / "o"), "--address", "auto",
                       env={**os.environ, "RAY_TMPDIR": str(ray_tmp)}, timeout=120)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = one_error_line(proc)
    assert "ray_current_cluster" in line and "127.0.0.1:9" in line and "--address" in line
    assert time.time() - started < 60


# --- an error's exit status is the same every time ------------------------------------------------


def test_a_refused_results_file_exits_2_every_time(tmp_path):
    """The one line, then exit 2, ten times over: no abort while native pools shut down (134)."""
    from orchestrator.record.results import rows_for_run, write_rows
    from trainables.config import resolve_config

    metrics = {"config_hash": "abc", "fdr_train": 1.0, "fdr_test": 1.0, "objective": 50.0, "epochs": 1,
               "best_epoch": 1, "train_seconds": 1.0, "node": "n", "device": "cpu",
               "la": {"none": {"param": None, "val_acc": 50.0, "many": 1.0, "medium": 2.0, "few": 3.0, "avg": 2.0,
                               "acc_per_class": [2.0] * 10}}}
    for seed in range(3):  # readable files first: their Arrow tables are alive when the bad one is refused
        rows = rows_for_run(metrics, {**resolve_config({"la": ["none"]}), "seed": seed}, spec="table4",
                            preset="smoke", method="wd", stage="repeat", mlflow_run_id=None,
                            versions={"wbsweep": "x", "torch": "x", "ray": "x"},
                            created_at=pd.Timestamp("2026-01-01", tz="UTC"))
        write_rows(tmp_path / "results", f"a{seed}", rows)
    (tmp_path / "results" / "zz.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 2 + b"PAR1")
    status_file(tmp_path, state="finished")
    runs = [wbsweep("status", "--out", str(tmp_path), timeout=60) for _ in range(10)]
    assert [p.returncode for p in runs] == [2] * 10, [(p.returncode, p.stderr[-300:]) for p in runs]
    for proc in runs:
        assert "zz.parquet" in one_error_line(proc)


# --- a real sweep whose Ray node dies under it -----------------------------------------------------

# One trial that lasts seconds (a checkpoint every epoch), so that it is killed mid-training.
SPEC = """\
name: nodedeath
methods:
  - {method: naive, la: [none]}
presets:
  cpu:
    train: {dataset: digits-lt, model: mlp3, width: 64, epochs: 300, checkpoint_seconds: 0}
    seeds: [0]
"""


def node_processes(ray_tmp: Path) -> list[int]:
    """The raylets of the clusters whose session folders are under ``ray_tmp``, then every process
    under them (the trial workers): a node as the out-of-memory killer or a lost machine leaves it."""
    parent, raylets = {}, []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if args and args[0].endswith("raylet/raylet") and any(str(ray_tmp) in a for a in args):
                raylets.append(int(proc.name))
    doomed = list(raylets)
    while True:
        more = [pid for pid, ppid in parent.items() if ppid in doomed and pid not in doomed]
        if not more:
            return doomed
        doomed += more


@pytest.mark.slow
def test_a_sweep_whose_ray_node_dies_ends_in_one_line_and_resumes(tmp_path):
    # Ray's files in a folder of this test's (short: socket paths), which also holds a stale
    # `ray_current_cluster`: a sweep without --address starts its own cluster and does not try it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="wbwd", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
    spec = tmp_path / "nodedeath.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "WBSWEEP_WATCHDOG_CHECK_S": "1", "WBSWEEP_HEARTBEAT_S": "1"}
    cmd = [*CLI, "run", str(spec), "--out", str(out), "--device", "cpu"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        mid = None
        while mid is None and time.time() < deadline and proc.poll() is None:
            mid = next((f for f in (out / "runs").glob("*/seed0") if (f / "checkpoint.pt").exists()
                        and not (f / "metrics.json").exists()), None)
            time.sleep(0.2)
        assert mid is not None, "the trial was not caught mid-training"
        victims = node_processes(ray_tmp)
        assert victims, "no raylet of the sweep's cluster"
        for pid in victims:  # the raylet first, then its workers (the trial among them)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=120)
        took = time.time() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_tree(str(ray_tmp))
    print(f"\nkilled {killed - t0:.1f} s after the start; the driver ended {took:.1f} s after its raylet was killed")
    assert proc.returncode == 3, err[-4000:]
    ours = [ln for ln in err.splitlines() if ln.startswith("wbsweep: ")]
    assert len(ours) == 1 and "Ray node of this machine is dead" in ours[0], err[-4000:]
    assert "run the same command again to resume" in ours[0]
    assert "Traceback" not in err, err[-4000:]
    assert took < 90
    status = wbsweep("status", "--out", str(out), timeout=120)
    assert status.returncode == 0 and "nodedeath preset cpu: stopped: the Ray node of this machine is dead" \
        in status.stdout, status.stdout
    assert not (mid / "metrics.json").exists()

    t1 = time.time()
    try:  # the same command resumes: the trial continues from its checkpoint
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        print(f"resumed to the end in {time.time() - t1:.1f} s")
    finally:
        kill_tree(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (mid / "metrics.json").exists() and len((mid / "attempts.log").read_text().splitlines()) == 2
    assert len(pd.read_parquet(out / "results")) == 1
    assert ": finished" in wbsweep("status", "--out", str(out), timeout=120).stdout
