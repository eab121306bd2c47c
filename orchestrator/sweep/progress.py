"""Progress lines for long sweeps: stages, trials done/running/failed, elapsed time and an ETA.

Plain lines on stderr (no cursor tricks) so that logs of cluster jobs read the same as a terminal.
The ETA assumes the remaining trials take as long, on average, as the finished ones did. Trials
that wait for resources (PENDING in Ray Tune: an autoscaler starting nodes, or a cluster too small)
are counted with the time the longest has waited.

Elapsed time, the ETA and waits are durations, on the monotonic clock (a step of the wall clock does
not change them); the start and the start of a wait are also kept as wall-clock times (``start``,
``waiting_since``: epoch seconds), which the status file records for people and other processes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total_trials: int, total_stages: int | list[str], quiet: bool = False):
        # the stages' labels (or their number): each one's state is kept for the status file
        labels = total_stages if isinstance(total_stages, list) else []
        self.stages: dict[str, str] = dict.fromkeys(labels, "waiting")  # waiting -> running -> done | failed
        self.total, self.total_stages = total_trials, len(labels) if labels else total_stages
        self.quiet = quiet
        self.start = time.time()  # wall clock, for the status file
        self._t0 = time.monotonic()  # elapsed, ETA
        self.finished = self.n_failed = self.skipped = 0
        self._running: set[str | None] = set()
        self.stages_done = 0
        self.active: list[str] = []
        self.failures: list[str] = []
        self.listener: Callable[[], None] | None = None  # told after every change (the status file)
        self.pending = 0  # trials waiting for resources (Ray Tune's PENDING)
        self.waiting_since: float | None = None  # when the longest-waiting of them began to wait (wall clock)
        self._waiting_t0: float | None = None  # the same on the monotonic clock
        self.reused: dict[str, int] = {}  # skipped trials by kind (REUSED)
        self.last = ""  # the last line printed

    def _print(self, msg: str) -> None:
        self.last = msg
        if not self.quiet:
            with contextlib.suppress(OSError):  # stderr gone (a closed terminal): the status file still tells
                print(msg, file=sys.stderr, flush=True)
        if self.listener is not None:
            self.listener()

    def line(self) -> str:
        elapsed = time.monotonic() - self._t0
        worked = self.finished + self.n_failed
        left = max(0, self.total - worked - self.skipped)
        # The first trials carry the start-up (Ray, the trial actors' imports): an ETA from them alone
        # overestimates a short sweep many times over, so it waits for a few.
        eta = f"ETA {_clock(elapsed / worked * left)}" if worked >= max(3, self.total // 10) else "ETA --"
        now = f" ({', '.join(self.active)})" if self.active else ""
        reused = f" ({self.skipped} reused)" if self.skipped else ""
        return (f"[stages {self.stages_done}/{self.total_stages}{now}] trials {self.finished + self.skipped}/"
                f"{self.total} done{reused}, {self.running} running, {self.pending_text()}{self.n_failed} failed | "
                f"elapsed {_clock(elapsed)} | {eta}")

    def pending_text(self) -> str:
        """"3 pending for 0:01:20, " (the longest wait) or "" when no trial has waited 2 s (on a busy
        fixed cluster the next trial is always pending for a moment)."""
        waited = self.waited()
        if not self.pending or waited < 2:
            return ""
        return f"{self.pending} pending for {_clock(waited)}, "

    def waited(self) -> float:
        """Seconds the longest-waiting trial has waited (0: none waits)."""
        return 0.0 if self._waiting_t0 is None else time.monotonic() - self._waiting_t0

    def set_pending(self, n: int, since: float | None) -> None:
        """``n`` trials wait for resources, the longest since ``since`` (``time.monotonic()`` then).
        Says nothing (the next line shows it); the status file is updated when the count changes."""
        changed = n != self.pending
        self.pending = n
        self._waiting_t0 = since if n else None
        self.waiting_since = time.time() - (time.monotonic() - since) if n and since is not None else None
        if changed and self.listener is not None:
            self.listener()

    def waiting(self, detail: str) -> None:
        """A line about the trials that wait: how many, for how long, and ``detail`` (what each needs,
        what is free, what the autoscaler does)."""
        self._print(f"waiting for resources: {self.pending} trial(s) pending for "
                    f"{_clock(self.waited())}; {detail}")

    def begin(self) -> None:
        self.start, self._t0 = time.time(), time.monotonic()
        self._print(self.line())

    def stage_started(self, label: str) -> None:
        self.active.append(label)
        self.stages[label] = "running"

    def stage_done(self, label: str) -> None:
        self.stages_done += 1
        self.stages[label] = "done"
        if label in self.active:
            self.active.remove(label)

    def stage_failed(self, label: str, reason: str) -> None:
        self.stage_done(label)
        self.stages[label] = "failed"
        self.failures.append(f"{label}: {reason}")
        self._print(f"FAILED stage {label}: {reason}")

    @property
    def running(self) -> int:
        return len(self._running)

    def started(self, trial_id: str) -> None:
        self._running.add(trial_id)
        if self.listener is not None:
            self.listener()

    def done(self, trial_id: str) -> None:
        self._running.discard(trial_id)
        self.finished += 1
        self._print(self.line())

    def stopped(self) -> None:
        """The sweep has stopped: no trial runs or waits any more."""
        self._running.clear()
        self.pending, self.waiting_since, self._waiting_t0 = 0, None, None

    def retrying(self, trial_id: str, what: str) -> None:
        self._print(f"RETRY {what}: the trial crashed; it resumes from its last checkpoint")

    def note(self, msg: str, always: bool = False) -> None:
        """Something the user should know that is not a trial's progress (a file set aside, ...);
        ``always``: also under --quiet (results that will not be reused, ...)."""
        if always and self.quiet:
            print(msg, file=sys.stderr, flush=True)
        self._print(msg)

    #: What a skipped (reused) trial was, for the one summary line at the end of a sweep.
    REUSED = {"choice": "tune-stage trials whose choice was recorded", "study": "Optuna trials of earlier runs",
              "rows": "models already in results", "model": "models already trained (a tune stage's own seed, "
              "an earlier run or another spec)"}

    def skip(self, n: int, kind: str) -> None:
        """``n`` planned trials need no training: work of the ``kind`` in :data:`REUSED`. Counted in
        the progress line and summed up once at the end, not a line each (a resume skips dozens)."""
        self.skipped += n
        self.reused[kind] = self.reused.get(kind, 0) + n
        if self.listener is not None:
            self.listener()

    def failed(self, reason: str, trial_id: str | None = None) -> None:
        """A trial failed, or (no ``trial_id``) could not start because what it needs failed."""
        self._running.discard(trial_id)
        self.n_failed += 1
        self.failures.append(reason)
        self._print(f"FAILED {reason}")

    def finish(self) -> None:
        line = self.line()
        if line.split(" | ")[0] != self.last.split(" | ")[0]:  # the last trial's line says it all (but the clock)
            self._print(line)
        if self.skipped:
            parts = [f"{n} {self.REUSED[kind]}" for kind, n in self.reused.items()]
            self._print(f"skipped {self.skipped} trial(s) whose work was done: {'; '.join(parts)}")
