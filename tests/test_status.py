"""`wbsweep status` reads the status files and the results: per variant, its own seeds."""

from __future__ import annotations

import json
import os
import socket
import time

import pandas as pd

from orchestrator.record.results import rows_for_run, write_rows
from orchestrator.sweep.status import status_text
from trainables.config import resolve_config


def _write_model(out, dataset: str, seed: int) -> None:
    metrics = {"config_hash": f"h-{dataset}", "fdr_train": 1.0, "fdr_test": 1.0, "objective": 50.0, "epochs": 1,
               "best_epoch": 1, "train_seconds": 1.0, "node": "n", "device": "cpu",
               "la": {"none": {"param": None, "val_acc": 50.0, "many": 1.0, "medium": 2.0, "few": 3.0, "avg": 2.0,
                               "acc_per_class": [2.0] * 10}}}
    cfg = {**resolve_config({"dataset": dataset, "la": ["none"]}), "seed": seed}
    rows = rows_for_run(metrics, cfg, spec="table2", preset="cpu", method="wd", stage="repeat", mlflow_run_id=None,
                        versions={"wbsweep": "x", "torch": "x", "ray": "x"},
                        created_at=pd.Timestamp("2026-01-01", tz="UTC"))
    write_rows(out / "results", f"table2-wd-{dataset}-s{seed}", rows)


def test_each_variant_lists_only_its_own_seeds(tmp_path):
    out = tmp_path
    (out / "status").mkdir()
    for variant, dataset, seeds in (("a", "digits-lt", [0, 1]), ("b", "digits", [2])):
        for seed in seeds:
            _write_model(out, dataset, seed)
        doc = {"spec": "table2", "preset": "cpu", "variant": variant, "dataset": dataset, "model": "mlp3",
               "state": "finished", "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time(),
               "started": time.time(), "storage": str(out),
               "trials": {"total": 3, "done": 3, "skipped": 0, "running": 0, "failed": 0},
               "stages": {"repeat wd": "done"}, "failures": []}
        (out / "status" / f"table2-cpu-{variant}.json").write_text(json.dumps(doc))
    lines = [ln for ln in status_text(out).splitlines() if "repeat wd" in ln]
    assert lines == ["    repeat wd              done  seeds in results: [0, 1]",
                     "    repeat wd              done  seeds in results: [2]"]


def test_a_stopped_sweep_shows_no_trial_running(tmp_path):
    """An interrupted sweep, or one whose driver is gone, runs nothing: not '2 running'."""
    (tmp_path / "status").mkdir()
    for name, state, pid in (("a", "interrupted", os.getpid()), ("b", "running", 2**31 - 2)):  # b: no such process
        doc = {"spec": "table4", "preset": name, "state": state, "pid": pid, "host": socket.gethostname(),
               "updated": time.time(), "started": time.time(), "waiting_since": time.time() - 60,
               "trials": {"total": 9, "done": 3, "skipped": 0, "running": 2, "failed": 0, "pending": 1},
               "stages": {"repeat wd": "running"}, "failures": []}
        (tmp_path / "status" / f"table4-{name}.json").write_text(json.dumps(doc))
    text = status_text(tmp_path)
    assert text.count("interrupted") == 2 and text.count(" 0 running,") == 2, text
    assert "waiting for resources" not in text


def test_the_last_progress_line_is_printed_once(capsys):
    """The sweep's end repeats the progress line only when the last trial's line is out of date (it
    was printed twice at the end of every run)."""
    from orchestrator.sweep.progress import Progress

    progress = Progress(total_trials=2, total_stages=1)
    for trial in ("t0", "t1"):
        progress.started(trial)
        progress.done(trial)
    progress.start -= 5  # a second has passed since the last line: its clock alone is no reason
    progress.finish()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[stages")]
    assert len(lines) == 2 and "trials 2/2 done" in lines[-1]
    progress.stages_done = 1  # something changed since: the end says it
    progress.finish()
    assert "[stages 1/1] trials 2/2 done" in capsys.readouterr().err
