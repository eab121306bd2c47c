"""A full disk stops the sweep in one line, resumable, instead of failing every trial after it.

Once a disk the sweep writes to is full, nothing more can be recorded: each later trial would
fail (and be retried) on it, and Ray Tune itself ends in a traceback reading the error files it
could not write. So the first sign of it stops the sweep, the way the watchdog does (exit status
3, :class:`~orchestrator.sweep.watchdog.SweepStopped`): a trial that failed with "No space left on
device" (trainables/run_files.py says so for PyTorch's writer too), a write of the driver (rows,
analyses, run files), an Optuna or MLflow store ("database or disk is full"), or any error while
the disk of ``--out`` has (almost) no space left. The line names the disk and the space left;
every finished model, each trial's checkpoint and the stores stay (their writes are whole or not
at all), so the same command, once space is freed, resumes.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.sweep.watchdog import SweepStopped
from trainables.errors import disk_full_cause, disk_full_reason, free_bytes, nearly_full, says_disk_full, size_text


class DiskFull(SweepStopped):
    """No space left on a disk the sweep writes to: one line, exit status 3; resumable."""

    def __init__(self, where: str, what: str):
        super().__init__(f"no space left on {where}: {what}; free space there, or move the folder to a larger disk")


def full_disk(out: Path, what: str, text: str = "") -> DiskFull:
    """The :class:`DiskFull` for a failure described by ``what`` (its error ``text``)."""
    if nearly_full(out):
        where = f"the disk of --out {out} ({size_text(free_bytes(out))} free)"
    else:  # another disk: a node's scratch or /tmp, the trial's storage; its error text names it
        where = "a disk the sweep writes to"
    detail = " ".join(text.split())
    return DiskFull(where, f"{what} ({detail})" if detail else what)


def disk_full(out: Path, exc: BaseException | None = None, text: str = "") -> bool:
    """Whether ``exc`` (or an error ``text``) is a full disk, or happened while --out's disk is full."""
    return (exc is not None and disk_full_cause(exc) is not None) or says_disk_full(text) or nearly_full(out)


def cause_text(exc: BaseException) -> str:
    """What ``exc`` says about the full disk, on one line."""
    return disk_full_reason(exc)
