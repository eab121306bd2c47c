"""Parquet results and the report built from them: hand-made rows, known means and stds."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from orchestrator.record.results import read_rows, rows_for_run, write_rows
from orchestrator.report.tables import report
from orchestrator.spec.paper import paper_reference
from trainables.config import resolve_config
from trainables.errors import WbsweepError

VERSIONS = {"wbsweep": "0.1.0", "torch": "2.x", "ray": "2.x"}


def fake_metrics(acc: float, fdr: float, la: tuple[str, ...] = ("none", "add", "mult")) -> dict:
    per_class = [acc] * 10
    return {
        "config_hash": "h", "fdr_train": fdr * 10, "fdr_test": fdr, "objective": acc, "epochs": 320,
        "best_epoch": 300, "train_seconds": 60.0, "node": "n1", "device": "cuda",
        "la": {x: {"param": None if x == "none" else (1.5 if x == "add" else 0.5), "val_acc": acc,
                   "many": acc + 10, "medium": acc, "few": acc - 10, "avg": acc, "acc_per_class": per_class}
               for x in la},
    }


def write_fake(out, spec="table4", method="wd", dataset="cifar100-lt", model="resnet34", accs=(40.0, 42.0, 44.0),
               preset="paper", config_hash="h"):
    cfg = resolve_config({"dataset": dataset, "model": model, "wd": 5e-3})
    for seed, acc in enumerate(accs):
        metrics = fake_metrics(acc, 100.0 + seed)
        metrics["config_hash"] = config_hash
        rows = rows_for_run(metrics, {**cfg, "seed": seed}, spec=spec, preset=preset, method=method, stage="repeat",
                            mlflow_run_id=f"run{seed}", versions=VERSIONS,
                            created_at=pd.Timestamp("2026-01-01", tz="UTC"))
        write_rows(out / "results", f"{spec}-{method}-{config_hash}-s{seed}", rows)


def test_rows_roundtrip_through_parquet_with_the_schema(tmp_path):
    write_fake(tmp_path)
    df = pd.read_parquet(tmp_path / "results")  # what users do
    assert len(df) == 9 and set(df["la"]) == {"none", "add", "mult"}
    assert df.loc[df["la"] == "add", "tau"].eq(1.5).all() and df.loc[df["la"] == "add", "gamma"].isna().all()
    assert df.loc[df["la"] == "mult", "gamma"].eq(0.5).all()
    assert list(df["acc_per_class"].iloc[0]) == [40.0] * 10
    assert not list((tmp_path / "results").glob(".*tmp"))  # no temporary files left behind
    assert len(read_rows(tmp_path / "results")) == 9


def test_report_mean_std_and_paper_values(tmp_path):
    write_fake(tmp_path)
    csv = report(tmp_path, "table4", fmt="csv", table=4)
    table = pd.read_csv(io.StringIO(csv))
    row = table[(table["method"] == "wd") & (table["la"] == "none")].iloc[0]
    assert row["acc_avg_mean"] == pytest.approx(42.0)
    assert row["acc_avg_std"] == pytest.approx(2.0)  # sample std of 40, 42, 44
    assert row["fdr_test_mean"] == pytest.approx(101.0)
    assert row["seeds"] == 3
    # The paper's Table 4: WD without LA on CIFAR100-LT is 46.0 ± 0.4 average accuracy.
    assert row["paper_acc_avg"] == pytest.approx(46.0) and row["paper_acc_avg_std"] == pytest.approx(0.4)
    text = report(tmp_path, "table4", fmt="table", table=4)
    assert "42.0 ± 2.0" in text and "46.0 ± 0.4" in text and "paper" in text
    md = report(tmp_path, "table4", fmt="markdown", table=4)
    assert sum(line.startswith("|---") for line in md.splitlines()) == 1 and "| WD |" in md


def test_report_has_no_paper_values_for_another_dataset(tmp_path):
    write_fake(tmp_path, dataset="digits-lt", model="mlp3", preset="cpu")
    table = pd.read_csv(io.StringIO(report(tmp_path, "table4", fmt="csv", table=4)))
    assert table["paper_acc_avg"].isna().all()
    assert "paper rows" not in report(tmp_path, "table4", table=4)


def test_report_uses_the_latest_config_of_a_method(tmp_path):
    write_fake(tmp_path, accs=(10.0, 10.0), config_hash="old")
    cfg = resolve_config({"dataset": "cifar100-lt", "model": "resnet34"})
    metrics = fake_metrics(50.0, 1.0)
    metrics["config_hash"] = "new"
    rows = rows_for_run(metrics, {**cfg, "seed": 0}, spec="table4", preset="paper", method="wd", stage="repeat",
                        mlflow_run_id="r", versions=VERSIONS, created_at=pd.Timestamp("2026-02-01", tz="UTC"))
    write_rows(tmp_path / "results", "new", rows)
    table = pd.read_csv(io.StringIO(report(tmp_path, "table4", fmt="csv")))
    assert table.loc[table["la"] == "none", "acc_avg_mean"].item() == pytest.approx(50.0)


def test_paper_reference_holds_table4():
    ref = paper_reference()
    t4 = ref[ref["table"] == 4]
    assert len(t4) == 12
    assert t4[(t4["method"] == "wd_fr_etf") & (t4["la"] == "mult")]["acc_avg"].item() == pytest.approx(53.0)


def test_a_corrupt_or_foreign_file_is_named(tmp_path):
    write_fake(tmp_path)
    bad = tmp_path / "results" / "zz-broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(WbsweepError, match="zz-broken.parquet"):
        read_rows(tmp_path / "results")
    bad.unlink()
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "results" / "foreign.parquet")
    with pytest.raises(WbsweepError, match="foreign.parquet.*not a wbsweep results file"):
        read_rows(tmp_path / "results")


def test_report_without_results_says_what_to_run(tmp_path):
    with pytest.raises(WbsweepError, match="wbsweep run table4"):
        report(tmp_path, "table4")
    write_fake(tmp_path, spec="other")
    with pytest.raises(WbsweepError, match="no results for spec 'table4'"):
        report(tmp_path, "table4")


def test_footnotes_speak_only_of_what_the_rows_use(tmp_path):
    """The ResNet32/ResNet34 remark only under ResNet rows with paper numbers; kept epochs where they
    are not the last; an LA parameter on the edge of its grid in most seeds."""
    write_fake(tmp_path)  # ResNet34 on CIFAR100-LT: paper rows shown; best epoch 300 of 320; τ 1.5, γ 0.5
    text = report(tmp_path, "table4", table=4)
    assert "'ResNet32' is the authors' CIFAR ResNet34" in text
    assert "WD: epochs kept 300, 300, 300 of 320" in text
    assert "edge of its grid" not in text  # τ = 1.5 and γ = 0.5 lie inside [1, 2] and [0, 1]
    mlp = tmp_path / "mlp"
    write_fake(mlp, spec="table4", dataset="digits-lt", model="mlp3", preset="cpu")
    assert "ResNet" not in report(mlp, "table4", table=4)


def test_an_la_parameter_on_the_grid_edge_is_marked(tmp_path):
    cfg = resolve_config({"dataset": "cifar100-lt", "model": "resnet34", "wd": 5e-3})
    for seed, tau in enumerate((1.0, 1.0, 1.35)):
        metrics = fake_metrics(40.0, 100.0)
        metrics["la"]["add"]["param"] = tau
        rows = rows_for_run(metrics, {**cfg, "seed": seed}, spec="table4", preset="paper", method="wb",
                            stage="repeat", mlflow_run_id=None, versions=VERSIONS,
                            created_at=pd.Timestamp("2026-01-01", tz="UTC"))
        write_rows(tmp_path / "results", f"wb-s{seed}", rows)
    text = report(tmp_path, "table4", table=4)
    assert "WB, add LA: τ on the edge of its grid [1, 2] in 2/3 seeds" in text
    assert "mult LA" not in text
