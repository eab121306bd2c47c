"""A full disk mid-sweep (a real small filesystem: tmpfs, mounted where the machine allows it, as
root does; skipped elsewhere): the sweep stops in one line naming the disk and what to do, exit 3,
no traceback, nothing finished lost, no torn temporary left; `analyze` and `report` on the full
disk say it in one line each; once space is freed the same command resumes and ends with every
model, those finished before not trained again. The MLflow outbox defers a full store at once
instead of retrying it (orchestrator/sweep/diskfull.py, docs/resilience.md)."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from helpers import CLI, wbsweep

SPEC = """name: tiny
methods:
  - {method: wd, la: [none]}
  - {method: wb, la: [none]}
presets:
  p:
    train: {dataset: digits-lt, model: mlp3, epochs: 2, lr: 0.01, width: 16}
    seeds: [0, 1, 2]
"""


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({proc.stderr.strip() or proc.returncode}); "
                    "run as root to test a full disk")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write zeros until the disk is full; the filler file (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(bytes(1 << 16))
                fh.flush()
        except OSError:
            pass
    return filler


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_disk_full_mid_sweep_stops_in_one_line_and_the_same_command_resumes(small_disk, tmp_path):
    spec, out = tmp_path / "tiny.yaml", small_disk / "out"
    spec.write_text(SPEC)
    run = [*CLI, "run", str(spec), "--preset", "p", "--out", str(out)]  # a cluster of its own: its disk fills
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while proc.poll() is None and len(list(out.glob("results/*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before the disk could be filled"
    filler = fill(small_disk)  # mid-sweep: some models are in results, others train
    _, err = proc.communicate(timeout=400)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 3 and "Traceback" not in err, err[-4000:]
    errors = [ln for ln in lines if ln.startswith("wbsweep: error:")]
    assert errors == [lines[-1]], err[-4000:]
    assert f"no space left on the disk of --out {out}" in lines[-1] and "run the same command again" in lines[-1]

    # nothing finished is lost, no torn temporary is left where the results live
    finished = {p.parent: sha(p.parent / "model.pt") for p in out.glob("runs/*/seed*/metrics.json")}
    before = {p.name: sha(p) for p in out.glob("results/*.parquet")}
    assert len(before) >= 2 and len(finished) >= len(before)
    assert not [p for p in (*out.glob("runs/*/seed*/*.tmp"), *out.glob("results/.*")) if p.is_file()]

    # the other commands on the full disk: one line each, no traceback
    an = wbsweep("analyze", "--out", str(out), "--spec", "tiny", "--names", "weight_norms")
    assert an.returncode == 1 and "Traceback" not in an.stderr, an.stderr[-3000:]
    assert "No space left on device" in an.stderr and "could not be analysed" in an.stderr
    rep = wbsweep("report", str(spec), "--out", str(out), "--preset", "p")
    assert rep.returncode == 0 and "Traceback" not in rep.stderr, rep.stderr[-3000:]
    assert "WARNING report not logged to MLflow: no space left" in rep.stderr

    # space freed: the same command resumes and ends with every model; those finished are reused
    filler.unlink()
    again = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    results = sorted(p.name for p in out.glob("results/*.parquet"))
    assert len(results) == 6 and set(before) <= set(results)
    assert all(sha(out / "results" / name) == digest for name, digest in before.items())
    assert all(sha(folder / "model.pt") == digest for folder, digest in finished.items())  # not retrained
    assert len(list(out.glob("runs/*/seed*/metrics.json"))) == 6


def test_the_outbox_defers_a_full_store_at_once_and_says_so(small_disk):
    """MLflow's SQLite store on a full disk: the call is deferred without retrying for retry_s, and
    the end of the sweep says in one line what could not be logged, without waiting either."""
    from mlflow import MlflowClient

    from orchestrator.tracking.tracker import Outbox

    client = MlflowClient(f"sqlite:///{small_disk / 'mlflow.db'}")
    exp = client.create_experiment("x", artifact_location=str(small_disk / "art"))
    filler = fill(small_disk)
    notes: list[str] = []
    outbox = Outbox(notes.append, retry_s=30)
    started = time.monotonic()
    for k in range(20):  # enough rows to need a page the disk cannot give
        outbox(f"run {k}", lambda: client.create_run(exp, tags={"t": "x" * 2000}))
    outbox.catch_up(final=True)
    assert time.monotonic() - started < 15, notes  # not 30 s per try
    assert notes and "no space left on the store's disk" in notes[0], notes
    assert "could not be made" in notes[-1] and "once space is freed" in notes[-1], notes
    assert all("\n" not in n for n in notes)
    filler.unlink()
