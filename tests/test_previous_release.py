"""A results folder written by the previous release is read, and the same command resumes it.

The folder (tests/data/previous-release-table4-smoke.tar.xz, see tests/data/README.md) is an
interrupted `wbsweep run table4 --preset smoke` of the previous release: MLflow runs left RUNNING,
an Optuna study, status and stage records, result files without today's `data_fingerprint` column.
Its configs hash differently today (the data fingerprint is part of a model's config), so the
resumed sweep trains every model again beside the old rows, which stay readable.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pandas as pd
import pytest
from helpers import wbsweep, wbsweep_here

pytestmark = pytest.mark.slow

ARCHIVE = Path(__file__).parent / "data" / "previous-release-table4-smoke.tar.xz"


@pytest.fixture()
def old_out(tmp_path) -> Path:
    out = tmp_path / "out"
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(out, filter="data")
    return out


def test_a_previous_release_folder_is_read_and_resumed(old_out, ray_cluster, capsys):
    old_files = sorted(p.name for p in (old_out / "results").glob("*.parquet"))
    old_rows = pd.concat([pd.read_parquet(old_out / "results" / f) for f in old_files])
    assert "data_fingerprint" not in old_rows.columns and len(old_rows) > 0  # what the fixture is

    # read as it is: the status, and every config the old folder holds. No table: none of its configs is
    # one today's spec resolves to (the data fingerprint is in today's hashes, smoke keeps the last epoch
    # now): said in one line, never shown as if they were
    status = wbsweep_here(capsys, "status", "--out", str(old_out))
    assert status.returncode == 0 and "table4 preset smoke" in status.stdout, status.stderr
    report = wbsweep_here(capsys, "report", "table4", "--preset", "smoke", "--out", str(old_out))
    assert report.returncode == 2 and "--all-configs" in report.stderr, report.stderr
    assert len(report.stderr.strip().splitlines()) == 1
    listed = wbsweep_here(capsys, "report", "table4", "--preset", "smoke", "--out", str(old_out), "--all-configs")
    assert listed.returncode == 0 and "Naive" in listed.stdout, listed.stderr

    # the same command resumes it
    run = wbsweep("run", "table4", "--preset", "smoke", "--out", str(old_out), "--quiet", "--address",
                  ray_cluster.address, env=ray_cluster.env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not reused" in run.stderr and "upgraded" in run.stderr, run.stderr[-3000:]

    # the old rows are still there, unchanged, and the README's pandas one-liner sees every column
    df = pd.read_parquet(old_out / "results")
    assert "data_fingerprint" in df.columns
    old = df[df["config_hash"].isin(set(old_rows["config_hash"]))]
    assert len(old) == len(old_rows) and old["data_fingerprint"].isna().all()
    key = ["method", "la", "seed", "config_hash"]
    pd.testing.assert_frame_equal(
        old.sort_values(key)[["acc_avg", "fdr_test", "created_at"]].reset_index(drop=True),
        old_rows.sort_values(key)[["acc_avg", "fdr_test", "created_at"]].reset_index(drop=True),
        check_dtype=False)
    new = df[~df["config_hash"].isin(set(old_rows["config_hash"]))]
    assert len(new) == 24 and not new.duplicated(["method", "la", "seed"]).any()
    assert new["data_fingerprint"].notna().all()

    # every MLflow run the old driver left RUNNING is ended; the status says finished
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{old_out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("table4").experiment_id], max_results=1000)
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert "finished" in wbsweep_here(capsys, "status", "--out", str(old_out)).stdout

    # the report shows today's models (the configs the spec resolves to now), not the old ones
    report = wbsweep_here(capsys, "report", "table4", "--preset", "smoke", "--out", str(old_out), "--format", "csv")
    assert report.returncode == 0, report.stderr
    naive_today = new[(new["method"] == "naive") & (new["la"] == "none")]["acc_avg"].mean()
    assert f"{naive_today:.1f}" in report.stdout, report.stdout
