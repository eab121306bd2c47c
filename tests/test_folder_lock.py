"""A results folder has one owner (orchestrator/record/folder_lock.py): the lock is refused while its
holder lives (on this machine: its pid runs and is the same process; from another machine: its
heartbeat is fresh), taken over with one line when it is stale, kept alive by a heartbeat, given
back on every way out, and a holder that lost it learns so at its next heartbeat (the sweep's
watchdog then stops it). Real files, real processes; the command-line tests are in
tests/test_two_drivers.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FakeSweep, trials, write_lock

from orchestrator.record.folder_lock import LOCK_NAME, FolderBusy, FolderLock, Holder, process_start
from orchestrator.sweep.watchdog import Limits, Node, SweepStopped, Watchdog

ME = Node("me", True, {"CPU": 4.0, "GPU": 0.0}, "10.0.0.1", 4000)  # the driver's own Ray node

HOLD = """
import sys, time
from pathlib import Path
from orchestrator.record.folder_lock import FolderLock
lock = FolderLock([Path(sys.argv[1])], note=print, command="wbsweep run held-by-a-test").acquire()
print("held", flush=True)
time.sleep(600)
"""


def holder_process(folder: Path) -> subprocess.Popen:
    """Another process of this machine that holds ``folder``'s lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def take(folder: Path) -> tuple[FolderLock, list[str]]:
    notes: list[str] = []
    return FolderLock([folder], note=notes.append, command="wbsweep run mine").acquire(), notes


def test_a_live_holder_on_this_machine_is_refused_and_a_dead_ones_lock_taken_over_in_one_line(tmp_path):
    proc = holder_process(tmp_path)
    try:
        with pytest.raises(FolderBusy) as busy:
            take(tmp_path)
        line = str(busy.value)
        assert "\n" not in line and f"is in use by `wbsweep run held-by-a-test` (pid {proc.pid} on " in line
        assert "wait for it to end" in line
    finally:
        proc.kill()
        proc.wait()
    (tmp_path / f"{LOCK_NAME}.{socket.gethostname()}-{proc.pid}.tmp").write_text("{")  # killed while writing
    lock, notes = take(tmp_path)  # its process is gone: the lock is stale
    assert len(notes) == 1 and f"took over the results folder {tmp_path} from `wbsweep run held-by-a-test` " \
        f"(pid {proc.pid}" in notes[0] and notes[0].endswith("its process is gone")
    assert Holder.parse((tmp_path / LOCK_NAME).read_text()).pid == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # what the dead one left is gone
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists() and not list(tmp_path.iterdir())  # nothing left behind


def test_a_pid_given_to_another_process_since_is_no_holder(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, pid_start=process_start(sleeper.pid))
        with pytest.raises(FolderBusy, match=f"pid {sleeper.pid} on"):  # the very process: live
            take(tmp_path)
        write_lock(tmp_path, pid=sleeper.pid, pid_start="12345")  # the pid's process started at another time
        lock, notes = take(tmp_path)
        assert notes and notes[0].endswith(f"pid {sleeper.pid} is another process now")
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("boot", [None, "another-boot"])
def test_a_lock_from_another_machine_is_live_while_its_heartbeat_is_fresh(tmp_path, boot):
    """Another host name, or this one's name on another machine (or boot): its pid means nothing
    here; its heartbeat decides: fresh within 10 heartbeats (at least 60 s), else stale."""
    host = "another-node" if boot is None else socket.gethostname()
    write_lock(tmp_path, host=host, pid=1, boot=boot, heartbeat=time.time() - 100)  # 15 s beats: 150 s limit
    with pytest.raises(FolderBusy, match=f"pid 1 on {host}, since .* UTC, last heartbeat 100 s ago"):
        take(tmp_path)
    write_lock(tmp_path, host=host, pid=1, boot=boot, heartbeat=time.time() - 3 * 3600)
    lock, notes = take(tmp_path)
    assert len(notes) == 1 and "its heartbeat is 3 h old" in notes[0]
    lock.release()


def test_the_heartbeat_rewrites_the_lock_and_notices_a_take_over(tmp_path, monkeypatch):
    monkeypatch.setenv("WBSWEEP_HEARTBEAT_S", "0.2")
    lock, _ = take(tmp_path)
    try:
        first = Holder.parse((tmp_path / LOCK_NAME).read_text()).heartbeat
        time.sleep(1.0)
        assert Holder.parse((tmp_path / LOCK_NAME).read_text()).heartbeat > first  # the keep-alive thread
        write_lock(tmp_path, host="another-node", pid=1)  # another command took the folder over
        problem = lock.beat()
        assert problem and "no longer this command's" in problem and "wbsweep run other" in problem
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "someone-else"  # not ours to remove


def test_the_watchdog_stops_a_sweep_whose_folder_was_taken_over(tmp_path):
    lock, _ = take(tmp_path)
    sweep = FakeSweep()
    sweep.lock = lock
    now = [0.0]
    dog = Watchdog(sweep, limits=Limits(stall_s=0.0, unschedulable_s=600.0, check_s=5.0, heartbeat_s=15.0),
                   nodes=lambda: [ME], own_node="me", clock=lambda: now[0], refuses=lambda h, p: False)
    now[0] += 16
    dog.on_step_end(iteration=1, trials=trials("RUNNING"))  # its own lock: beaten, goes on
    assert Holder.parse((tmp_path / LOCK_NAME).read_text()).token == lock.token
    write_lock(tmp_path, host="another-node", pid=1)
    now[0] += 16
    with pytest.raises(SweepStopped, match="no longer this command's"):
        dog.on_step_end(iteration=2, trials=trials("RUNNING"))
    assert sweep.states[-1][0] == "stopped"
    lock.release()


def test_a_file_that_is_not_a_lock_is_named_not_removed(tmp_path):
    (tmp_path / LOCK_NAME).write_text("something else")
    with pytest.raises(FolderBusy, match=f"{tmp_path / LOCK_NAME} is not a wbsweep lock"):
        take(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == "something else"


def test_every_folder_or_none(tmp_path):
    """--out and a --storage folder apart from it: both taken, or neither."""
    out, store = tmp_path / "out", tmp_path / "store"
    out.mkdir()
    store.mkdir()
    proc = holder_process(store)
    try:
        with pytest.raises(FolderBusy, match=str(store)):
            FolderLock([out, store], note=print).acquire()
        assert not (out / LOCK_NAME).exists()  # the one it had taken is given back
    finally:
        proc.kill()
        proc.wait()
