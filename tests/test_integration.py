"""End to end: `wbsweep run table4 --preset smoke` through a real local Ray cluster, real Optuna
studies, a real MLflow SQLite store and real Parquet files, then the report and a rerun.

One sweep is shared by the tests of this module (it takes a couple of minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from helpers import trained, wbsweep, wbsweep_here

from orchestrator.spec.experiment import load_experiment

pytestmark = pytest.mark.slow

SPECS = Path(__file__).resolve().parent.parent / "search_spaces"

TABLE4_ROWS = {
    ("naive", "none"), ("cb", "none"), ("wd", "none"), ("wd", "add"), ("wd", "mult"), ("wb", "none"),
    ("wd_etf", "none"), ("wd_etf", "add"), ("wd_etf", "mult"),
    ("wd_fr_etf", "none"), ("wd_fr_etf", "add"), ("wd_fr_etf", "mult"),
}


@pytest.fixture(scope="module")
def sweep(smoke_sweep) -> tuple[Path, subprocess.CompletedProcess]:
    return smoke_sweep


def test_results_have_every_row_of_table4_for_every_seed(sweep):
    out, proc = sweep
    df = pd.read_parquet(out / "results")
    seeds = load_experiment("table4", "smoke").seeds
    assert len(df) == len(TABLE4_ROWS) * len(seeds)
    assert set(zip(df["method"], df["la"], strict=True)) == TABLE4_ROWS
    assert not df.duplicated(["spec", "dataset", "model", "method", "la", "seed"]).any()
    for (method, la), g in df.groupby(["method", "la"]):
        assert sorted(g["seed"]) == seeds, (method, la)
    required = ["spec", "dataset", "model", "method", "la", "seed", "stage", "config_hash", "acc_many",
                "acc_medium", "acc_few", "acc_avg", "fdr_train", "fdr_test", "epochs", "train_seconds", "node",
                "mlflow_run_id", "wbsweep_version", "wd", "fr", "tau", "gamma"]
    assert set(required) <= set(df.columns)
    assert (df["spec"] == "table4").all() and (df["dataset"] == "digits-lt").all() and (df["stage"] == "repeat").all()
    for col in ["acc_many", "acc_medium", "acc_few", "acc_avg"]:
        assert df[col].between(0, 100).all(), col
    assert (df["fdr_train"] > 0).all() and (df["fdr_test"] > 0).all()
    # The average is the mean of per-class recalls, consistent with the stored per-class values.
    for _, row in df.iterrows():
        assert row["acc_avg"] == pytest.approx(sum(row["acc_per_class"]) / len(row["acc_per_class"]))
    # The method knobs reached the trainer: no WD for naive/cb, WD for the others; LA params in the paper grids.
    assert (df.loc[df["method"].isin(["naive", "cb"]), "wd"] == 0).all()
    assert (df.loc[df["method"].isin(["wd", "wd_etf", "wd_fr_etf"]), "wd"] > 0).all()
    assert (df.loc[df["method"] == "wd_fr_etf", "fr"] > 0).all()
    assert df.loc[df["la"] == "add", "tau"].between(1.0, 2.0).all()
    assert df.loc[df["la"] == "mult", "gamma"].between(0.0, 1.0).all()
    # WB's rows are a second stage of WD's model of the same seed: same features, so the same FDR.
    wd = df[(df["method"] == "wd") & (df["la"] == "none")].set_index("seed")
    wb = df[df["method"] == "wb"].set_index("seed")
    assert (wb["parent_hash"] == wd["config_hash"]).all()
    assert wb["fdr_test"].to_numpy() == pytest.approx(wd["fdr_test"].to_numpy(), rel=1e-6)
    # Progress lines were shown while it ran.
    assert "[stages 0/10]" in proc.stderr and "trials 20/20 done" in proc.stderr and "ETA" in proc.stderr


def test_mlflow_has_a_finished_run_per_trained_model_with_artifacts(sweep):
    from mlflow import MlflowClient

    out, _ = sweep
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("table4")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    # the models trained here (a model reused by a later stage is also listed there: a reference run)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags
                and r.data.tags.get("wbsweep.kind") != "reference"]
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    # a child run per trained model (tune trials and repeats, the shared seed trained once)
    assert len(children) == len(set(trained(out)))
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} <= set(parents)
    stages = {(r.data.tags["wbsweep.stage"], r.data.tags["wbsweep.method"]) for r in parents.values()
              if r.data.tags.get("wbsweep.kind") != "report"}  # and the spec-level run of the report
    assert ("tune", "wd") in stages and ("repeat", "naive") in stages and ("repeat", "wb") in stages
    df = pd.read_parquet(out / "results")
    for run_id in set(df["mlflow_run_id"]):
        run = client.get_run(run_id)
        arts = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.json", "model.pt", "logits.npz", "metrics.json"} <= arts
        assert "fdr_test" in run.data.metrics and "train_loss" in run.data.metrics
        assert len(client.get_metric_history(run_id, "val_acc")) == int(run.data.params["epochs"]) or \
            run.data.params.get("stage2") == "True"


def test_report_csv_rebuilds_the_table_from_parquet(sweep, capsys):
    out, _ = sweep
    proc = wbsweep_here(capsys, "report", "table4", "--out", str(out), "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 + len(TABLE4_ROWS)
    from io import StringIO

    table = pd.read_csv(StringIO(proc.stdout))
    df = pd.read_parquet(out / "results")
    wd_mult = df[(df["method"] == "wd") & (df["la"] == "mult")]
    row = table[(table["method"] == "wd") & (table["la"] == "mult")].iloc[0]
    assert row["acc_avg_mean"] == pytest.approx(wd_mult["acc_avg"].mean(), rel=1e-5)
    assert row["acc_avg_std"] == pytest.approx(wd_mult["acc_avg"].std(), rel=1e-5)
    text = wbsweep_here(capsys, "report", "table4", "--out", str(out))
    assert text.returncode == 0 and "WD&FR&ETF" in text.stdout and "±" in text.stdout


def test_auto_fuse_measures_once_and_groups_by_it(sweep):
    """``fuse: auto`` (the default): one Ray task measured how many of the smoke preset's MLPs to fuse
    (WB's second stages, another fusion key of the same architecture, take that measurement too); the
    folder and the machine's record keep it with its ladder of throughputs, the run said it in one
    line, and no trial trained more models than that K."""
    out, proc = sweep
    records = list(json.loads((out / "fusion.json").read_text()).values())
    assert len(records) == 2 and records[0] == records[1]  # first stages, second stages
    record = records[0]
    machine = json.loads((out.parent / f"{out.name}-fusion.json").read_text())
    assert list(machine.values()) == [record]
    ladder = [int(k) for k in record["img_per_s_per_model"]]
    assert ladder[0] == 1 and record["k"] in ladder and record["k"] <= record["k_memory"]
    said = [ln for ln in proc.stderr.splitlines() if "fuse auto:" in ln]
    assert len(said) == 2 and "measuring" in said[0] and f"K={record['k']}" in said[1], said
    fused_k = pd.read_parquet(out / "results")["fused_k"]
    assert fused_k.notna().all() and fused_k.max() <= record["k"]
    assert (fused_k.max() > 1) == (record["k"] > 1)


def test_a_rerun_trains_nothing_duplicates_nothing_and_another_spec_lists_the_models_it_reuses(sweep, tmp_path,
                                                                                              ray_cluster):
    """Table 4's smoke preset again, under another spec name (a copy of table4.yaml, on a copy of the
    shared sweep's folder): nothing is trained, table4's rows and MLflow runs stay as they were, one
    summary line says what was skipped, a torn stage record is made again from the study, and the
    new spec's experiment lists every model its table uses as reference runs to the runs that
    trained them (MLflow as the place to look, issue #15)."""
    import os
    import shutil

    from mlflow import MlflowClient

    src, _ = sweep
    out = tmp_path / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("ray", "status"))
    spec = tmp_path / "t4copy.yaml"
    spec.write_text((SPECS / "table4.yaml").read_text().replace("name: table4", "name: t4copy"))
    before_models = set(trained(out))
    folders = sorted(os.listdir(out / "runs"))
    before_rows = pd.read_parquet(out / "results")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("table4").experiment_id
    table4 = {r.info.run_id for r in client.search_runs([exp_id], max_results=1000)}
    # a torn stage record is set aside and its choice made again from the study in optuna.db; the
    # others are found again although the device flag differs (the stage key is the config's science)
    records = sorted((out / "stages").glob("tune-*.json"))
    assert len(records) >= 2
    chosen = records[0].read_text()
    records[0].write_text("")
    proc = wbsweep("run", str(spec), "--preset", "smoke", "--out", str(out), "--device", "cpu",
                   "--address", ray_cluster.address, env=ray_cluster.env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # one summary line, not a line per reused trial; the recorded choices cover every trial of their stages
    summary = [ln for ln in proc.stderr.splitlines() if ln.startswith("skipped ")]
    assert len(summary) == 1 and "tune-stage trials whose choice was recorded" in summary[0], proc.stderr[-4000:]
    assert "unreadable record" in proc.stderr and records[0].with_suffix(".bad").exists()
    assert json.loads(records[0].read_text())["searched"] == json.loads(chosen)["searched"]
    assert set(trained(out)) == before_models and sorted(os.listdir(out / "runs")) == folders
    after_rows = pd.read_parquet(out / "results")
    assert len(after_rows.query("spec == 'table4'")) == len(before_rows)
    copy_rows = after_rows.query("spec == 't4copy'")
    assert len(copy_rows) == len(before_rows) and not copy_rows.duplicated(["method", "la", "seed"]).any()
    assert {r.info.run_id for r in client.search_runs([exp_id], max_results=1000)} == table4
    runs = client.search_runs([client.get_experiment_by_name("t4copy").experiment_id], max_results=1000)
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    # table4's models, references only, also those the new spec's own search proposed again (its study is
    # its own) and whose trials only re-reported them
    assert kids and all(r.data.tags.get("wbsweep.kind") == "reference" for r in kids), \
        [(r.info.run_name, r.data.tags.get("wbsweep.stage")) for r in kids]
    assert any(r.data.tags["wbsweep.stage"] == "tune" for r in kids)
    # the table's 12 models (6 methods x 2 seeds), and the trials of the re-proposed searches
    assert copy_rows["mlflow_run_id"].nunique() == 12
    assert set(copy_rows["mlflow_run_id"]) <= {r.data.tags["wbsweep.reference_of"] for r in kids} <= table4
    assert [r for r in runs if r.data.tags.get("wbsweep.kind") == "report"]


TWO_PRESETS = """\
name: tiny
methods:
  - {method: wd, la: [none]}
presets:
  a:
    train: {dataset: digits-lt, model: mlp3, width: 8, epochs: 1, checkpoint_seconds: 0}
    hyper: {wd: 5.0e-3}
    seeds: [0]
  b:
    extends: a
    seeds: [0, 1]
"""


def test_a_preset_sharing_a_config_with_another_gets_rows_for_every_seed(tmp_path, ray_cluster, capsys):
    """Preset b trains the same config as preset a: its seed 0 is a's model (not trained again), and
    b's report shows both seeds (the skip used to look at a's rows and leave b without seed 0)."""
    spec, out = tmp_path / "tiny.yaml", tmp_path / "out"
    spec.write_text(TWO_PRESETS)
    for preset in ("a", "b"):
        proc = wbsweep("run", str(spec), "--preset", preset, "--out", str(out), "--address", ray_cluster.address,
                       env=ray_cluster.env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_parquet(out / "results")
    assert sorted(df[df["preset"] == "b"]["seed"]) == [0, 1] and sorted(df[df["preset"] == "a"]["seed"]) == [0]
    attempts = [len(p.read_text().splitlines()) for p in (out / "runs").glob("*/seed*/attempts.log")]
    assert sorted(attempts) == [1, 1]  # two models, each trained once
    rep = wbsweep_here(capsys, "report", str(spec), "--preset", "b", "--out", str(out), "--format", "csv")
    assert rep.returncode == 0 and ",2," in rep.stdout.splitlines()[1], rep.stdout
