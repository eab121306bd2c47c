"""A step of the wall clock (a laptop resumed from suspend, an NTP correction) stops no healthy sweep:
the watchdog's timers (stall, unschedulable wait, heartbeat) and the progress line's durations run
on the monotonic clock, while what is written for people and other processes (the status file's
``updated``, ``started``, ``waiting_since``) stays wall-clock (docs/resilience.md, "Clock steps").

The clocks are moved in a process of its own, before anything of wbsweep is imported (as a clock
step reaches every reader of that clock): ``time.time`` and ``time.monotonic`` read an offset the
scenario sets. The watchdog is made as the driver makes it (its own clock, no ``clock`` given)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HOURS = 5 * 3600.0

SCENARIOS = r"""
import json, sys, time
_wall, _mono = time.time, time.monotonic
offset = {"time": 0.0, "monotonic": 0.0}
time.time = lambda: _wall() + offset["time"]
time.monotonic = lambda: _mono() + offset["monotonic"]
sys.path.insert(0, sys.argv[1])

from helpers import FakeSweep, trials  # noqa: E402
from orchestrator.sweep.progress import Progress  # noqa: E402
from orchestrator.sweep.watchdog import Limits, Node, SweepStopped, Watchdog  # noqa: E402

ME = Node("me", True, {"CPU": 4.0, "GPU": 0.0}, "10.0.0.1", 4000)

HOURS = float(sys.argv[2])
out = {}


def dog(sweep, **limits):
    lim = {"stall_s": 60.0, "unschedulable_s": 60.0, "check_s": 0.0, "heartbeat_s": 15.0, **limits}
    return Watchdog(sweep, limits=Limits(**lim), nodes=lambda: [ME], own_node="me", refuses=lambda h, p: False)


def steps(watchdog, *statuses, n=3):
    try:
        for i in range(n):
            watchdog.on_step_end(iteration=i, trials=trials(*statuses))
    except SweepStopped as exc:
        return exc.problem
    return None


# the wall clock jumps hours ahead, then back past where it began; trials wait for a node none has
sweep = FakeSweep(cpus=1, gpus=1)
w = dog(sweep)
steps(w, "PENDING", n=1)
offset["time"] = HOURS
ahead = steps(w, "PENDING")
offset["time"] = -HOURS
back = steps(w, "PENDING")
out["wall_jump"] = {"ahead": ahead, "back": back, "status_writes": len(sweep.states)}
offset["time"] = 0.0

# the monotonic clock passes the stall limit; the wall clock has not moved
sweep = FakeSweep()
w = dog(sweep)
steps(w, "RUNNING", n=1)
offset["monotonic"] += 61.0
out["monotonic_stall"] = {"stopped": steps(w, "RUNNING", n=1), "state": sweep.states[-1][0] if sweep.states else None}

# the heartbeat: due after 15 s of the monotonic clock, not after a jump of the wall clock
sweep = FakeSweep()
w = dog(sweep, stall_s=0.0)
offset["time"] += HOURS
steps(w, "RUNNING", n=1)
writes_after_jump = len(sweep.states)
offset["monotonic"] += 16.0
steps(w, "RUNNING", n=1)
out["heartbeat"] = {"after_wall_jump": writes_after_jump, "after_16_s": len(sweep.states)}
offset["time"] = 0.0

# the progress line's durations, and the wall-clock times it keeps for the status file
p = Progress(total_trials=4, total_stages=1, quiet=True)
p.begin()
p.set_pending(2, time.monotonic())
started, waiting_since, wall = p.start, p.waiting_since, time.time()
offset["time"] += HOURS
line_after_jump = p.line()
offset["monotonic"] += 90.0
out["progress"] = {"after_wall_jump": line_after_jump, "after_90_s": p.line(),
                   "start_is_wall": abs(started - wall) < 5, "waiting_since_is_wall": abs(waiting_since - wall) < 5,
                   "kept": p.start == started and p.waiting_since == waiting_since}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def scenarios() -> dict:
    tests = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", SCENARIOS, str(tests), str(HOURS)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_wall_clock_jumping_hours_ahead_or_back_stops_no_sweep(scenarios):
    s = scenarios["wall_jump"]
    assert s["ahead"] is None and s["back"] is None, s  # no stall, no endless wait seen
    assert s["status_writes"] == 0  # nor a heartbeat due


def test_the_monotonic_clock_passing_the_stall_limit_stops_it_whatever_the_wall_clock_says(scenarios):
    s = scenarios["monotonic_stall"]
    assert s["stopped"] and s["stopped"].startswith("no trial started, reported or ended for 0:01:0"), s
    assert s["state"] == "stopped"


def test_the_heartbeat_follows_the_monotonic_clock(scenarios):
    assert scenarios["heartbeat"] == {"after_wall_jump": 0, "after_16_s": 1}


def test_progress_durations_ignore_the_wall_clock_and_its_records_stay_wall_clock(scenarios):
    s = scenarios["progress"]
    assert "elapsed 0:00:0" in s["after_wall_jump"] and "pending" not in s["after_wall_jump"], s  # not 5:00:00
    assert "2 pending for 0:01:3" in s["after_90_s"] and "elapsed 0:01:3" in s["after_90_s"], s
    assert s["start_is_wall"] and s["waiting_since_is_wall"] and s["kept"], s
