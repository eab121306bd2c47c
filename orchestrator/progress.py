"""Progress lines for long sweeps: stage, trials done/running/failed, elapsed time and an ETA.

Plain lines on stderr (no cursor tricks) so that logs of cluster jobs read the same as a terminal.
The ETA assumes the remaining trials take as long, on average, as the finished ones did.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, quiet: bool = False):
        self.total = total
        self.quiet = quiet
        self.start = time.time()
        self.label = ""
        self.finished = self.running = self.n_failed = self.skipped = 0
        self.failures: list[str] = []

    def _print(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = time.time() - self.start
        worked = self.finished + self.n_failed
        left = max(0, self.total - worked - self.skipped)
        eta = f"ETA {_clock(elapsed / worked * left)}" if worked else "ETA --"
        return (f"{self.label}: {self.finished + self.skipped}/{self.total} done, {self.running} running, "
                f"{self.n_failed} failed | elapsed {_clock(elapsed)} | {eta}")

    def stage(self, label: str) -> None:
        self.label = label
        self._print(self.line())

    def started(self) -> None:
        self.running += 1

    def done(self, seconds: float) -> None:
        self.running = max(0, self.running - 1)
        self.finished += 1
        self._print(self.line())

    def skip(self, n: int, why: str) -> None:
        self.skipped += n
        self._print(f"{self.label}: {n} trial(s) skipped ({why})")

    def failed(self, reason: str) -> None:
        self.running = max(0, self.running - 1)
        self.n_failed += 1
        self.failures.append(reason)
        self._print(f"FAILED {reason}")
        self._print(self.line())

    def finish(self) -> None:
        self.label = "sweep"
        self._print(self.line())
