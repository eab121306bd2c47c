"""Corrupt, foreign or mistyped files (results, status files, specs) get one clear line naming the
file or key, never a traceback, and never change the results already written. Real files in
tmp_path, read by the real code."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from helpers import digest

from orchestrator.cli import main
from orchestrator.record.results import read_rows, rows_for_run, write_rows
from orchestrator.spec.experiment import load_experiment
from trainables.config import resolve_config
from trainables.errors import WbsweepError


def write_model(out: Path, preset: str = "smoke", seed: int = 0) -> None:
    """One finished model of table4 (method wd) in ``out/results``, as a sweep writes it."""
    cfg = {**resolve_config({"la": ["none"]}), "seed": seed}
    metrics = {"config_hash": "abc", "fdr_train": 1.0, "fdr_test": 1.0, "objective": 50.0, "epochs": 1,
               "best_epoch": 1, "train_seconds": 1.0, "node": "n", "device": "cpu",
               "la": {"none": {"param": None, "val_acc": 50.0, "many": 1.0, "medium": 2.0, "few": 3.0, "avg": 2.0,
                               "acc_per_class": [2.0] * 10}}}
    rows = rows_for_run(metrics, cfg, spec="table4", preset=preset, method="wd", stage="repeat", mlflow_run_id=None,
                        versions={"wbsweep": "x", "torch": "x", "ray": "x"},
                        created_at=pd.Timestamp("2026-01-01", tz="UTC"))
    write_rows(out / "results", f"table4-{preset}-wd-s{seed}", rows)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("wbsweep: error: "), err[-2000:]
    return lines[0]


# --- a results file whose columns have the wrong types ----------------------------------------------


@pytest.mark.parametrize(("column", "value"), [("seed", "abc"), ("acc_per_class", 1.0), ("created_at", "yesterday")])
def test_results_file_with_a_mistyped_column_is_named(tmp_path, capsys, column: str, value: Any) -> None:
    write_model(tmp_path)
    bad = read_rows(tmp_path / "results")
    bad[column] = value  # every column present, one of the wrong type
    bad.to_parquet(tmp_path / "results" / "edited.parquet")
    before = digest(tmp_path / "results")

    with pytest.raises(WbsweepError) as info:
        read_rows(tmp_path / "results")
    msg = str(info.value)
    assert "edited.parquet" in msg and f"column {column}" in msg and "move it out of" in msg

    assert main(["report", "table4", "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert "edited.parquet" in line and column in line
    assert digest(tmp_path / "results") == before


# --- a status file that is valid JSON but not a status ------------------------------------------------


def write_status(out: Path) -> None:
    doc = {"spec": "table4", "preset": "smoke", "variant": None, "dataset": "digits-lt", "model": "mlp3",
           "state": "finished", "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time(),
           "started": time.time(), "storage": str(out),
           "trials": {"total": 2, "done": 2, "skipped": 0, "running": 0, "failed": 0},
           "stages": {"repeat wd": "done"}, "failures": []}
    (out / "status").mkdir(exist_ok=True)
    (out / "status" / "table4-smoke.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("content", ["[]", "{}", "null", '"text"', '{"state": "running"}',
                                     '{"spec": "a", "preset": "b", "state": "running", "host": "h", "pid": 1, '
                                     '"updated": 0, "trials": {"done": "x"}, "stages": {}, "failures": []}',
                                     '{"spec": "a", "preset": "b", "state": "running", "host": "h", "pid": -1, '
                                     '"updated": 0, "trials": {}, "stages": {}, "failures": []}'],
                         ids=["list", "empty", "null", "string", "missing-keys", "bad-trials", "bad-pid"])
def test_malformed_status_file_is_one_line_and_the_others_still_show(tmp_path, capsys, content: str) -> None:
    write_model(tmp_path, seed=0)
    write_model(tmp_path, seed=1)
    write_status(tmp_path)
    (tmp_path / "status" / "a-foreign.json").write_text(content)
    before = digest(tmp_path / "results")

    assert main(["status", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out.splitlines()
    named = [ln for ln in out if "a-foreign.json" in ln]
    assert len(named) == 1 and "not a wbsweep status file" in named[0], captured.out
    assert any(ln.startswith("table4 preset smoke: finished") for ln in out), captured.out  # the good one
    assert any("seeds in results: [0, 1]" in ln for ln in out), captured.out
    assert digest(tmp_path / "results") == before
    # report and analyze look for the storage a run recorded there: they skip the foreign file too (the
    # hand-made rows are no config the spec resolves to: --all-configs lists them)
    assert main(["report", "table4", "--out", str(tmp_path), "--format", "csv", "--all-configs"]) == 0
    assert "wd" in capsys.readouterr().out


# --- spec mistakes that used to be silently ignored or crash later ------------------------------------


def base_spec() -> dict[str, Any]:
    return {
        "name": "mine",
        "methods": [{"method": "naive", "la": ["none"]}, {"method": "wd", "la": ["none", "add"]}],
        "presets": {
            "base": {"train": {"dataset": "digits-lt", "epochs": 1, "width": 16},
                     "hyper": {"wd": 0.01}, "search": {"wd": {"loguniform": [1.0e-4, 1.0e-1]}},
                     "trials": 2, "seeds": [0]},
            "small": {"extends": "base", "trials": 1},
        },
    }


def write_spec(tmp: Path, doc: dict[str, Any]) -> str:
    path = tmp / "mine.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def _set(**top: Any):
    return lambda d: {**d, **top}


def _search(dist: dict[str, Any]):
    def change(d):
        d["presets"]["base"]["search"] = dist
        return d
    return change


def _extends(value: Any):
    def change(d):
        d["presets"]["small"]["extends"] = value
        return d
    return change


def _variant_name(name: str):
    def change(d):
        d["presets"]["base"]["variants"] = [{"name": name}]
        return d
    return change


# (id, change to the valid base spec, preset, words the one line must contain)
SPEC_CASES = [
    ("unknown-top-key", _set(layuot="fdr"), "base", ["layuot", "Did you mean 'layout'", "presets", "paper_table"]),
    ("unknown-paper-table", _set(paper_table=5), "base", ["paper_table 5", "4, 6, 7, 8, 9, 10"]),
    ("paper-table-of-another-layout", _set(paper_table=2), "base", ["paper_table 2", "4, 6, 7, 8, 9, 10"]),
    ("paper-table-as-text", _set(paper_table="table4"), "base", ["paper_table 'table4'", "4, 6"]),
    ("paper-table-with-figures", _set(layout="figure", paper_table=4), "base", ["paper_table 4", "paper_figure"]),
    ("text-choice-for-number", _search({"wd": {"choice": [0.001, "lots"]}}), "base",
     ["search.wd.choice", "'lots'", "wd must be a finite number"]),
    ("switch-choice-for-number", _search({"wd": {"choice": [True, False]}}), "base", ["search.wd.choice", "True"]),
    ("negative-choice", _search({"wd": {"choice": [0.01, -1.0]}}), "base", ["search.wd.choice", "-1.0", "minimum"]),
    ("bad-choice-of-a-named-option", _search({"loss": {"choice": ["ce", "focal"]}}), "base",
     ["search.loss.choice", "'focal'", "ce, cb, dr"]),
    ("range-below-minimum", _search({"rho": {"uniform": [0.1, 0.5]}}), "base", ["search.rho.uniform", "minimum"]),
    ("name-with-slash", _set(name="my/tiny"), "base", ["'my/tiny'", "file names"]),
    ("name-dot-dot", _set(name=".."), "base", ["'..'", "file names"]),
    ("name-with-space", _set(name="my table"), "base", ["'my table'"]),
    ("variant-name-with-slash", _variant_name("a/b"), "base", ["variant name 'a/b'"]),
    ("extends-a-list", _extends(["base"]), "small", ["preset 'small'", "extends takes one preset name", "['base']"]),
    ("extends-a-mapping", _extends({"preset": "base"}), "small", ["extends takes one preset name"]),
]


@pytest.mark.parametrize("case", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_spec_mistake_is_one_line_naming_the_key(case, tmp_path, capsys) -> None:
    _, change, preset, words = case
    path = write_spec(tmp_path, change(base_spec()))
    assert main(["run", path, "--preset", preset, "--plan"]) == 2  # --plan: nothing would run anyway
    line = one_error_line(capsys)
    assert "mine.yaml" in line, line
    for word in words:
        assert word in line, (word, line)


def test_the_valid_forms_still_load(tmp_path) -> None:
    """The checks above reject only the mistakes: the same keys with fitting values load."""
    doc = base_spec()
    doc.update(title="Mine", layout="accuracy", paper_table=4, default_preset="small", name="my-table_4.v2")
    doc["presets"]["base"]["search"] = {"wd": {"choice": [0.001, 0.01]}, "bn_scale": {"grid": [0.01, 0.2, 0.01]},
                                        "loss": {"choice": ["ce", "cb"]}}
    exp = load_experiment(write_spec(tmp_path, doc))
    assert exp.preset == "small" and exp.paper_table == 4 and exp.name == "my-table_4.v2"
    assert exp.search["wd"] == {"choice": [0.001, 0.01]}
    fdr = {**base_spec(), "layout": "fdr", "paper_table": 2}
    assert load_experiment(write_spec(tmp_path, fdr), "base").paper_table == 2


# --- report of a preset without results ---------------------------------------------------------------


def test_report_of_a_preset_without_rows_lists_the_presets_that_have_some(tmp_path, capsys) -> None:
    write_model(tmp_path, preset="smoke")
    write_model(tmp_path, preset="paper")
    before = digest(tmp_path / "results")
    assert main(["report", "table4", "--preset", "cpu", "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert "preset 'cpu'" in line and "presets with results: paper, smoke" in line, line
    assert digest(tmp_path / "results") == before


def test_files_of_an_earlier_version_are_upgraded_so_pandas_sees_every_column(tmp_path) -> None:
    """pyarrow's dataset discovery takes the first file's schema: one file without a column added
    later (here the first by name) hides that column of every row from ``pd.read_parquet``."""
    import pyarrow.parquet as pq

    from orchestrator.record.results import SCHEMA, upgrade_files

    write_model(tmp_path, seed=0)
    write_model(tmp_path, seed=1)
    first = tmp_path / "results" / "table4-smoke-wd-s0.parquet"
    pq.write_table(pq.read_table(first).drop_columns(["data_fingerprint"]), first)  # as an earlier version wrote it
    (tmp_path / "results" / "junk.parquet").write_bytes(b"not parquet")  # left alone, named by read_rows
    before = digest(tmp_path / "results")
    assert "data_fingerprint" not in pd.read_parquet(tmp_path / "results" / first.name).columns
    assert upgrade_files(tmp_path / "results") == 1
    after = digest(tmp_path / "results")
    assert {k for k in before if before[k] != after[k]} == {first.name} and set(after) == set(before)
    (tmp_path / "results" / "junk.parquet").unlink()
    df = pd.read_parquet(tmp_path / "results")
    assert list(df.columns) == SCHEMA.names and len(df) == 2 and df["acc_avg"].tolist() == [2.0, 2.0]
    assert upgrade_files(tmp_path / "results") == 0  # nothing left to upgrade
