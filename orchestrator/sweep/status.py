"""A sweep's status file, ``DIR/status/<spec>-<preset>[-<variant>].json``: its one writer
(:class:`StatusFile`, the driver's), its readers (`wbsweep status`, and where a folder's results
live: :func:`recorded_store`) and its format (:data:`_FIELDS`).

`wbsweep status` shows what is done, running, failed and left in a results folder. It reads only
files: the status files (rewritten by the driver on every event and, as a heartbeat, every
``heartbeat_s`` seconds) and the Parquet results. A status that says "running" whose driver process
is gone (killed) is shown as interrupted; one whose heartbeat is overdue (a hung driver, or one on
another host, whose pid cannot be checked here) as not responding; one the watchdog stopped
(orchestrator/sweep/watchdog.py) as stopped with the reason. Running the same `wbsweep run` resumes
each.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.record.folder_lock import holder_of
from orchestrator.record.results import mixed_data, read_rows
from trainables import storage
from trainables.errors import WbsweepError


def _alive(pid: int, host: str) -> bool | None:
    """Whether the driver still runs (None: it ran on another host, we cannot tell)."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: A "running" status older than this many heartbeats, and at least STALE_MIN_S (the loop may be
#: busy for minutes in one step: artifacts uploaded, analyses computed), means its loop has stopped.
STALE_BEATS = 10
STALE_MIN_S = 300.0


def heartbeat_overdue(status: dict, now: float | None = None) -> float | None:
    """Seconds since a status file was last written when its driver's heartbeat is overdue, else
    None. Files of drivers that kept no heartbeat (no ``heartbeat_s``) are never overdue.

    Wall-clock on purpose: ``updated`` was written by another process, maybe on another machine, and
    only the wall clock (kept in step by NTP) means the same there; the limit (minutes) is far above
    any skew NTP leaves. A step of this machine's clock can make one reading early or late; the
    sweep itself never acts on it (its own timers are monotonic: orchestrator/sweep/watchdog.py)."""
    beat = status.get("heartbeat_s")
    if isinstance(beat, bool) or not isinstance(beat, int | float) or beat <= 0:
        return None
    age = (time.time() if now is None else now) - status["updated"]
    return age if age > max(STALE_MIN_S, STALE_BEATS * beat) else None


_NUMBER = (int, float)
#: What `wbsweep status` reads from a status file (:meth:`StatusFile.write` writes it).
_FIELDS = {"spec": str, "preset": str, "state": str, "host": str, "pid": int, "updated": _NUMBER,
           "trials": dict, "stages": dict, "failures": list}
_COUNTS = ("total", "done", "skipped", "running", "failed")


def malformed_status(st: object) -> str | None:
    """What is wrong with a parsed status file, or None when `status_text` can show it."""
    if not isinstance(st, dict):
        what = {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(type(st), "a number")
        return f"it holds {what}, not an object"
    missing = [k for k in _FIELDS if k not in st]
    if missing:
        return f"missing {', '.join(missing)}"
    for key, kind in _FIELDS.items():
        if isinstance(st[key], bool) or not isinstance(st[key], kind):
            return f"{key} is {json.dumps(st[key])[:40]}"
    if not 0 < st["pid"] < 2**31:  # os.kill(0 or -1, 0) would test other processes than the driver
        return f"pid is {st['pid']}"
    t = st["trials"]
    bad = [k for k in _COUNTS if isinstance(t.get(k), bool) or not isinstance(t.get(k), int)]
    if bad:
        return f"trials lacks the counts {', '.join(bad)}"
    if not all(isinstance(label, str) and label.strip() for label in st["stages"]):
        return "a stage without a name"
    if not isinstance(st.get("storage") or "", str):
        return "storage is not a path"
    if not isinstance(st.get("reason") or "", str):
        return "reason is not text"
    return None


def status_text(out: Path) -> str:
    if not out.is_dir():
        raise WbsweepError(f"{out} is not a results folder; give the --out of a `wbsweep run`.")
    files = sorted((out / "status").glob("*.json"))
    if not files:
        raise WbsweepError(f"{out} holds no sweep yet (no {out / 'status'}); "
                           f"start one with `wbsweep run SPEC --out {out}`.")
    rows_of: dict[str, pd.DataFrame] = {}  # storage -> its results
    lines = []
    for f in files:
        try:
            st = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            lines.append(f"{f.name}: unreadable status file (the driver may be writing it; try again)")
            continue
        problem = malformed_status(st)
        if problem:  # the driver writes whole files (os.replace), so this one is foreign or damaged
            lines.append(f"{f.name}: not a wbsweep status file ({problem}); skipped, move it out of {f.parent}")
            continue
        state = st["state"]
        silent = heartbeat_overdue(st) if state == "running" else None
        if state == "running" and _alive(st["pid"], st["host"]) is False:
            state = "interrupted (driver gone; run the same command again to resume)"
        elif silent is not None:
            state = (f"not responding (last heartbeat {silent / 60:.0f} min ago: its driver, pid {st['pid']} on "
                     f"{st['host']}, hangs or is gone; stop it if it still runs, then run the same command again "
                     "to resume)")
        elif state == "stopped":
            state = f"stopped: {st.get('reason') or 'by its watchdog'} (run the same command again to resume)"
        age = time.time() - st["updated"]
        t = st["trials"]
        left = max(0, t["total"] - t["done"] - t["skipped"] - t["failed"])
        variant = f" variant {st['variant']}" if st.get("variant") is not None else ""
        lines.append(f"{st['spec']} preset {st['preset']}{variant}: {state}, updated {age:.0f} s ago on {st['host']}")
        waiting = ""
        if state == "running" and t.get("pending") and isinstance(st.get("waiting_since"), int | float):
            waiting = f"{t['pending']} waiting for resources ({time.time() - st['waiting_since']:.0f} s), "
        running = t["running"] if state == "running" else 0  # a driver gone left its last counts
        lines.append(f"  trials: {t['done'] + t['skipped']} done ({t['skipped']} reused), {running} running, "
                     f"{waiting}{t['failed']} failed, {left} left of {t['total']}")
        store = recorded_storage(st, f, out) or str(out)
        if store not in rows_of:
            rows_of[store] = read_rows(storage.join(store, "results"))
        rows = rows_of[store]
        for label, s in st["stages"].items():
            mine = rows[(rows["spec"] == st["spec"]) & (rows["preset"] == st["preset"])
                        & (rows["method"] == label.split()[-1])]
            for key in ("dataset", "model"):  # one variant of a spec over several datasets/models
                if st.get(key):
                    mine = mine[mine[key] == st[key]]
            seeds = sorted(set(mine["seed"].astype(int))) if label.startswith("repeat") else []
            extra = f"  seeds in results: {seeds}" if label.startswith("repeat") else ""
            lines.append(f"    {label:<22} {s}{extra}")
        for failure in st["failures"]:
            lines.append(f"  FAILED {failure}")
    for rows in rows_of.values():
        lines += [f"WARNING {line}" for line in mixed_data(rows)]
    holder = holder_of(out)
    if holder is not None:
        lines.append(f"in use by {holder.describe()}")
    stores = ", ".join(storage.join(s, "ray") for s in rows_of) or str(out / "ray")
    lines.append(f"logs: {stores} (per-trial error.txt), MLflow: {out / 'mlflow.db'}")
    return "\n".join(lines) + "\n"


# --- writing ------------------------------------------------------------------------------------------


class StatusFile:
    """The status file of one sweep (spec, preset, variant), rewritten whole (``os.replace``) on every
    change of its progress and, as a heartbeat, every ``heartbeat_s`` (orchestrator/sweep/watchdog.py).
    ``state``: running -> finished | failed | interrupted | stopped."""

    def __init__(self, out: Path, exp: Any, store: str, progress: Any, heartbeat_s: float):
        self.out, self.exp, self.store, self.progress, self.heartbeat_s = out, exp, store, progress, heartbeat_s
        variant = f"-{exp.variant}" if exp.variant is not None else ""
        self.path = out / "status" / f"{exp.name}-{exp.preset}{variant}.json"
        self.state = "running"
        self.error = False  # a file that could not be written has been reported

    def write(self, state: str | None = None, reason: str | None = None) -> None:
        """Write the file (``state``: the new state, else the current one). A file that cannot be
        written (a full disk, a folder made read-only) is said once; the sweep goes on."""
        from trainables.config import DEFAULTS

        self.state = state or self.state
        p, exp, running = self.progress, self.exp, self.state == "running"
        doc = {
            "spec": exp.name, "preset": exp.preset, "variant": exp.variant, "state": self.state,
            "dataset": exp.train.get("dataset", DEFAULTS["dataset"]),
            "model": exp.train.get("model", DEFAULTS["model"]),
            "pid": os.getpid(), "out": str(self.out.resolve()),
            # none when the results are in --out, so a folder moved or copied later reads its own
            "storage": None if self.store == str(self.out.resolve()) else self.store,
            "host": socket.gethostname(), "updated": time.time(), "started": p.start,
            # no trial runs or waits once the driver has stopped
            "trials": {"total": p.total, "done": p.finished, "skipped": p.skipped,
                       "running": p.running if running else 0,
                       "failed": p.n_failed, "pending": p.pending if running else 0},
            "waiting_since": p.waiting_since if running else None,
            "stages": dict(p.stages), "failures": p.failures,
            "heartbeat_s": self.heartbeat_s, "reason": reason,
        }
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, indent=2))
            os.replace(tmp, self.path)
            self.error = False
        except OSError as exc:  # `wbsweep status` lags, the sweep goes on
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a full disk: no torn temporary left
            if not self.error:
                self.error = True
                p.note(f"WARNING cannot write the status file {self.path}: {exc}; `wbsweep status` "
                       "shows an older state until it can")


# --- where a folder's results live --------------------------------------------------------------------


def recorded_storage(doc: dict[str, Any], status_file: Path, out: Path) -> str | None:
    """The storage a sweep recorded in its status file ``status_file`` (under ``out/status``), seen
    from ``out`` as it is now: None when the results were the sweep's own ``--out`` (recorded as
    none, or, by earlier versions, as that folder's absolute path: a folder moved or copied since
    must read and write its own results, never the old place's)."""
    rec = doc.get("storage")
    if not rec or not isinstance(rec, str):
        return None
    if storage.is_remote(rec):
        return rec
    was_out = rec == doc.get("out") or (Path(rec) / "status" / status_file.name).is_file()
    if was_out or (not Path(rec).exists() and (out / "results").is_dir()):
        return None
    return rec


def recorded_store(out: Path, spec: str | None = None) -> str | None:
    """The storage the latest sweep (of ``spec``, if given) in ``out`` recorded, or None (its own
    folder, or no sweep). Files that are not status files of ours are passed over."""
    recorded = []
    for f in sorted((out / "status").glob("*.json")) if out.is_dir() else []:
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if malformed_status(doc):  # not a status file of ours: `wbsweep status` names it
            continue
        if spec is None or doc["spec"] == spec:
            recorded.append((doc["updated"], recorded_storage(doc, f, out)))
    return max(recorded, key=lambda t: t[0])[1] if recorded else None
