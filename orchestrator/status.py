"""`wbsweep status`: what is done, running, failed and left in a results folder.

It reads only files: the sweep's status file (``DIR/status/<spec>-<preset>.json``, rewritten by
the driver on every event) and the Parquet results. A status that says "running" whose driver
process is gone (killed) is shown as interrupted: running the same `wbsweep run` resumes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pandas as pd

from orchestrator.results import read_rows
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
        state = st["state"]
        if state == "running" and _alive(st["pid"], st["host"]) is False:
            state = "interrupted (driver gone; run the same command again to resume)"
        age = time.time() - st["updated"]
        t = st["trials"]
        left = max(0, t["total"] - t["done"] - t["skipped"] - t["failed"])
        variant = f" variant {st['variant']}" if st.get("variant") is not None else ""
        lines.append(f"{st['spec']} preset {st['preset']}{variant}: {state}, updated {age:.0f} s ago on {st['host']}")
        lines.append(f"  trials: {t['done'] + t['skipped']} done ({t['skipped']} reused), {t['running']} running, "
                     f"{t['failed']} failed, {left} left of {t['total']}")
        store = st.get("storage") or str(out)
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
    stores = ", ".join(storage.join(s, "ray") for s in rows_of) or str(out / "ray")
    lines.append(f"logs: {stores} (per-trial error.txt), MLflow: {out / 'mlflow.db'}")
    return "\n".join(lines) + "\n"
