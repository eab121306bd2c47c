"""A results folder works where it is: copied, the copy never writes into the original (whose files
stay byte-identical); moved, the old path is never made again. Its MLflow store records absolute
artifact locations (``file:///<folder>/mlartifacts/...``), which the first command that logs to it
in its new place re-points, in one line (orchestrator/record/stores.py ``repoint_artifacts``).
docs/resilience.md, "A folder moved or copied"."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wbsweep

from orchestrator.record.stores import ARTIFACT_COLUMNS
from orchestrator.tracking.tracker import Tracker, default_tracking_uri, prepare_store

SPEC = """name: moving
methods:
  - {{method: wd, la: [none]}}
presets:
  p:
    train: {{dataset: digits-lt, model: mlp3, epochs: {epochs}, lr: 0.05, width: 16}}
    seeds: [0]
"""


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def references(db: Path, text: str) -> list[tuple[str, str]]:
    """(table, column) of every value in the SQLite file ``db`` that contains ``text``."""
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    found = []
    try:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for col in [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]:
                n = con.execute(f'SELECT COUNT(*) FROM "{table}" WHERE instr(CAST("{col}" AS TEXT), ?) > 0',
                                (text,)).fetchone()[0]
                if n:
                    found.append((table, col))
    finally:
        con.close()
    return found


def mlflow_locations(out: Path) -> list[str]:
    """Every artifact location the folder's MLflow store gives, as MLflow's client reads them."""
    from mlflow import MlflowClient

    client = MlflowClient(default_tracking_uri(out))
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps], max_results=1000)
    return [e.artifact_location for e in exps] + [r.info.artifact_uri for r in runs]


# --- the store alone: MLflow's columns (a guard for the SQL, which MLflow's API cannot replace) ---------


#: A store in folder argv[1] with one run and one artifact, made in a process of its own (as by a sweep
#: there: MLflow caches each run's artifact place per process).
LOG_ONE_RUN = """
import sys
from pathlib import Path
from orchestrator.tracking.tracker import Tracker, default_tracking_uri
a = Path(sys.argv[1])
tracker = Tracker(default_tracking_uri(a), "moving", a / "mlartifacts")
run = tracker.run("wd seed0", {"wbsweep.config_hash": "abc", "wbsweep.seed": "0"})
tracker.client.log_artifact(run, sys.argv[2])
tracker.finish(run)
print(run)
"""


def test_a_copied_store_is_re_pointed_to_its_own_folder_everywhere_it_names_one(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "f.txt").write_text("x")
    made = subprocess.run([sys.executable, "-c", LOG_ONE_RUN, str(a), str(tmp_path / "f.txt")], capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    run = made.stdout.split()[-1]
    shutil.copytree(a, b)
    old = (a / "mlartifacts").as_uri()
    assert references(b / "mlflow.db", old), "the store no longer records absolute locations: drop the SQL"
    before = tree(a)

    notes = prepare_store(default_tracking_uri(b), b / "mlartifacts")
    assert len(notes) == 1 and f"moved or copied from {a}" in notes[0] and "1 run(s)" in notes[0], notes
    assert references(b / "mlflow.db", old) == []  # every column MLflow keeps a location in (ARTIFACT_COLUMNS)
    assert {t for t, _ in ARTIFACT_COLUMNS} >= {"experiments", "runs"}
    new = (b / "mlartifacts").as_uri()
    assert all(loc.startswith(new) for loc in mlflow_locations(b))
    assert prepare_store(default_tracking_uri(b), b / "mlartifacts") == []  # once
    moved = Tracker(default_tracking_uri(b), "moving", b / "mlartifacts")
    moved.client.log_artifact(run, str(tmp_path / "f.txt"), artifact_path="again")
    assert (b / "mlartifacts" / run / "artifacts" / "again" / "f.txt").is_file()
    assert tree(a) == before


# --- the real commands ----------------------------------------------------------------------------------


def ok(*args: str, cluster=None) -> subprocess.CompletedProcess:
    """``wbsweep ARGS``, which must succeed; a ``run`` joins ``cluster`` (the session's)."""
    extra = ("--address", cluster.address) if cluster is not None else ()
    proc = wbsweep(*args, *extra, env=cluster.env if cluster is not None else None, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def spec(folder: Path, epochs: int) -> str:
    path = folder / f"moving-{epochs}.yaml"
    path.write_text(SPEC.format(epochs=epochs))
    return str(path)


@pytest.mark.slow
def test_a_copied_folder_never_writes_into_the_original_and_a_moved_one_never_makes_it_again(tmp_path, ray_cluster):
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    ok("run", spec(tmp_path, 1), "--out", str(a), "--fuse", "off", cluster=ray_cluster)
    shutil.copytree(a, b, symlinks=True)
    before = tree(a)

    # the copy continues with a changed spec (new models, new MLflow runs), then reports
    ran = ok("run", spec(tmp_path, 2), "--out", str(b), "--fuse", "off", cluster=ray_cluster)
    said = [ln for ln in ran.stderr.splitlines() if "moved or copied from" in ln]
    assert len(said) == 1 and f"moved or copied from {a}: its MLflow store now keeps artifacts under " \
        f"{b / 'mlartifacts'}" in said[0], ran.stderr[-3000:]
    ok("report", spec(tmp_path, 2), "--out", str(b))
    assert tree(a) == before, "the copy wrote into the original"
    assert all(loc.startswith((b / "mlartifacts").as_uri()) for loc in mlflow_locations(b))
    assert len(list((b / "mlartifacts").glob("*/artifacts/metrics.json"))) == 2  # each model's files, in B

    # the original moved: it works in its new place, and its old path is not made again
    a.rename(c)
    ran = ok("run", spec(tmp_path, 3), "--out", str(c), "--fuse", "off", cluster=ray_cluster)
    assert sum("moved or copied from" in ln for ln in ran.stderr.splitlines()) == 1
    ok("report", spec(tmp_path, 3), "--out", str(c))
    assert not a.exists()
    assert all(loc.startswith((c / "mlartifacts").as_uri()) for loc in mlflow_locations(c))
    assert references(c / "mlflow.db", (a / "mlartifacts").as_uri()) == []
