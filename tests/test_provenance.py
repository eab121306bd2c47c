"""What produced a row (the git commit, a dirty tree, the packages), results folders of earlier
versions read with nulls, and `wbsweep train --config` training a saved run again exactly."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from orchestrator.record import provenance
from orchestrator.record.results import SCHEMA, read_results, rows_for_run, write_rows
from trainables.config import resolve_config

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def fake_rows(versions: dict, acc: float = 40.0) -> list[dict]:
    cfg = {**resolve_config({"dataset": "digits-lt", "model": "mlp3", "wd": 5e-3}), "seed": 0}
    metrics = {"config_hash": "h", "fdr_train": 10.0, "fdr_test": 5.0, "epochs": 2, "best_epoch": 2,
               "train_seconds": 1.0, "node": "n", "device": "cpu",
               "la": {x: {"param": None if x == "none" else 0.5, "val_acc": acc, "many": acc, "medium": acc,
                          "few": acc, "avg": acc, "acc_per_class": [acc] * 10} for x in ("none", "add", "mult")}}
    return rows_for_run(metrics, cfg, spec="table4", preset="cpu", method="wd", stage="repeat", mlflow_run_id=None,
                        versions=versions, created_at=pd.Timestamp("2026-01-01", tz="UTC"))


@needs_git
def test_rows_record_the_commit_of_a_git_checkout_and_whether_it_was_dirty(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git(repo, "add", "code.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git(repo, "rev-parse", "HEAD")

    write_rows(tmp_path / "results", "clean", fake_rows(provenance.versions(repo)))
    (repo / "notes.txt").write_text("untracked files do not make a tree dirty\n")
    assert provenance.code_version(repo)["git_dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    write_rows(tmp_path / "results", "dirty", fake_rows(provenance.versions(repo)))

    df = read_results(tmp_path / "results")
    assert set(df["git_commit"]) == {head} and len(head) == 40
    assert sorted(df["git_dirty"].unique()) == [False, True]
    base = provenance.installed_version().split("+")[0]
    assert set(df["wbsweep_version"]) == {f"{base}+g{head[:12]}", f"{base}+g{head[:12]}.dirty"}
    packages = json.loads(df["packages"].iloc[0])
    assert packages["scipy"] and packages["torch"] == df["torch_version"].iloc[0] and packages["python"]

    # a folder that is not the top of a checkout (an installed copy): the installed version, no commit
    plain = provenance.code_version(tmp_path)
    assert plain == {"wbsweep": provenance.installed_version(), "git_commit": None, "git_dirty": None}
    tags = provenance.mlflow_tags(repo)
    assert tags["mlflow.source.git.commit"] == head and tags["mlflow.source.type"] == "LOCAL"


def checkout_head() -> str:
    root = provenance.SOURCE_ROOT
    if GIT is None or not (root / ".git").exists():
        pytest.skip("wbsweep is not running from a git checkout (or git is missing)")
    return git(root, "rev-parse", "HEAD")


def test_this_checkouts_commit_is_what_rows_record():
    assert provenance.versions()["git_commit"] == checkout_head()


def test_a_file_without_the_newer_columns_reads_with_nulls(tmp_path):
    folder = tmp_path / "results"
    new = fake_rows({"wbsweep": "1", "torch": "t", "ray": "r", "git_commit": "c" * 40, "git_dirty": False,
                     "packages": "{}"})
    write_rows(folder, "b-new", new)
    # an earlier version's file: no data_fingerprint, git_commit, git_dirty, packages; listed first
    old = pa.Table.from_pylist(fake_rows({"wbsweep": "0.1.0", "torch": "t", "ray": "r"}), schema=SCHEMA)
    old = old.drop_columns(["data_fingerprint", "git_commit", "git_dirty", "packages"])
    pq.write_table(old, folder / "a-old.parquet")

    assert "git_commit" not in pd.read_parquet(folder).columns  # pyarrow takes the first file's columns
    for df in (read_results(folder), pd.read_parquet(folder, schema=SCHEMA)):  # the README's calls
        assert list(df.columns) == SCHEMA.names and len(df) == 6
        by_version = df.groupby("wbsweep_version")["git_commit"]
        assert by_version.apply(lambda s: s.isna().all())["0.1.0"]
        assert (by_version.first()["1"]) == "c" * 40
        assert df.loc[df["wbsweep_version"] == "0.1.0", "git_dirty"].isna().all()


def test_train_config_trains_a_saved_run_again_exactly(tmp_path, capsys):
    args = ["train", "--method", "wd_fr_etf", "--preset", "smoke", "--device", "cpu", "--out", str(tmp_path / "a")]
    assert main(args) == 0
    run = next((tmp_path / "a").glob("*/seed0"))
    capsys.readouterr()
    assert main(["train", "--config", str(run / "config.json"), "--out", str(tmp_path / "b")]) == 0
    assert "reproduced exactly" in capsys.readouterr().err
    again = tmp_path / "b" / run.parent.name / "seed0"
    before, after = (json.loads((f / "metrics.json").read_text()) for f in (run, again))
    for k in ("train_seconds", "eval_seconds", "node"):  # when and where, not what
        before.pop(k, None), after.pop(k, None)
    assert before == after


@pytest.mark.slow
def test_a_sweeps_rows_name_the_commit_and_train_config_reproduces_its_runs(smoke_sweep, tmp_path, capsys):
    out, _ = smoke_sweep
    rows = read_results(out / "results")  # the rows the sweep's driver wrote name this checkout's commit
    assert set(rows["git_commit"]) == {checkout_head()} and rows["packages"].notna().all()
    configs = sorted(out.glob("runs/*/seed*/config.json"))
    stage2 = next(c for c in configs if json.loads(c.read_text())["stage2"])  # WB: from its stage-1 model
    for config in (configs[0], stage2):
        assert main(["train", "--config", str(config), "--out", str(tmp_path)]) == 0
        err = capsys.readouterr().err
        if int(json.loads((config.parent / "metrics.json").read_text()).get("fused_k") or 1) == 1:
            assert "reproduced exactly" in err, (config, err)
        else:  # trained in a fused group: the same up to the batched arithmetic's rounding
            assert "reproduced exactly" in err or "trained fused" in err, (config, err)
            rel = re.search(r"largest relative difference (\S+)\)", err)
            assert rel is None or float(rel.group(1)) < 1e-3, err


def test_train_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    cases = [(tmp_path / "missing" / "config.json", "no such file"), (bad, "not readable JSON")]
    for path, words in cases:
        assert main(["train", "--config", str(path), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    bad.write_text(json.dumps({**resolve_config({}), "init_from": str(tmp_path / "gone.pt")}))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path)]) == 2
    assert "stage-1 model" in capsys.readouterr().err
