"""The MLflow views of a sweep (orchestrator/sweep/stage_runs.py), on the shared `table4 --preset smoke`
sweep (a real MLflow SQLite store): repeat parents hold the mean and std of their Parquet rows and
list every seed (the tune stage's reused model as a reference run), the chosen tune trial is tagged,
Optuna's trials name their model and run, the report is a spec-level run, the run folders' files
are stored once (another spec that reuses the models lists them in its own experiment: in
tests/test_integration.py's rerun test)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from orchestrator.spec.experiment import load_experiment

pytestmark = pytest.mark.slow



def runs_of(client: MlflowClient, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=2000)


@pytest.fixture(scope="module")
def smoke(smoke_sweep) -> tuple[Path, MlflowClient]:
    out, _ = smoke_sweep
    return out, MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


def test_repeat_parents_hold_mean_and_std_of_their_rows_and_list_every_seed(smoke):
    out, client = smoke
    seeds = load_experiment("table4", "smoke").seeds
    runs = runs_of(client, "table4")
    by_id = {r.info.run_id: r for r in runs}
    df = pd.read_parquet(out / "results")
    parents = [r for r in runs
               if r.data.tags.get("wbsweep.stage") == "repeat" and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 6
    references = 0
    for p in parents:
        method = p.data.tags["wbsweep.method"]
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        assert sorted(int(r.data.tags["wbsweep.seed"]) for r in kids) == seeds, method  # every seed listed
        assert all(r.info.status == "FINISHED" for r in kids)
        for r in kids:
            if r.data.tags.get("wbsweep.kind") == "reference":  # the tune stage's model, not trained again
                references += 1
                source = by_id[r.data.tags["wbsweep.reference_of"]]
                assert by_id[source.data.tags["mlflow.parentRunId"]].data.tags["wbsweep.stage"] == "tune"
                assert source.data.tags.get("wbsweep.chosen") == "true"
                assert r.data.metrics["fdr_test"] == source.data.metrics["fdr_test"]
                assert not client.list_artifacts(r.info.run_id)
        rows = df[df["method"] == method]
        m = p.data.metrics
        assert m["seeds"] == len(seeds)
        for la, g in rows.groupby("la"):
            for k in ("acc_many", "acc_medium", "acc_few", "acc_avg"):
                assert m[f"mean.{la}.{k}"] == pytest.approx(g[k].mean(), rel=1e-9), (method, la, k)
                assert m[f"std.{la}.{k}"] == pytest.approx(g[k].std(), rel=1e-9, abs=1e-12), (method, la, k)
        per_model = rows.drop_duplicates(["config_hash", "seed"])
        # the row's config as the parent's params: what its seeds' runs have, but the seed
        params = dict(p.data.params)
        assert params.pop("config_hashes") == ", ".join(
            f"{s}:{h}" for s, h in sorted(zip(per_model["seed"], per_model["config_hash"], strict=True)))
        trained = next(r for r in kids if r.data.tags.get("wbsweep.kind") != "reference")
        own = trained.data.params
        assert params.items() <= own.items() and set(own) - set(params) == {"seed"} | ({"init_from"} & set(own)), method
        assert m["mean.fdr_test"] == pytest.approx(per_model["fdr_test"].mean(), rel=1e-9)
        assert m["std.fdr_train"] == pytest.approx(per_model["fdr_train"].std(), rel=1e-9)
    assert references == 4  # wd, wb, wd_etf, wd_fr_etf: seed 0 is their tune stage's chosen model
    # one chosen trial per tune stage
    tunes = [r for r in runs if r.data.tags.get("wbsweep.stage") == "tune" and "mlflow.parentRunId" not in r.data.tags]
    for t in tunes:
        chosen = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == t.info.run_id
                  and r.data.tags.get("wbsweep.chosen") == "true"]
        assert len(chosen) == 1, t.info.run_name


def test_optuna_trials_name_their_model_and_run(smoke):
    import optuna

    out, client = smoke
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
    trials = [t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)]
    assert len(trials) == 8
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["wbsweep.config_hash"] == t.user_attrs["config_hash"]
        # named by the knobs its trial searched (the UI tells the trials of a stage apart by them)
        assert all(f"{k}={v:.3g}" in run.info.run_name for k, v in t.params.items()), run.info.run_name


def test_the_report_is_a_spec_level_run(smoke):
    out, client = smoke
    runs = [r for r in runs_of(client, "table4") if r.data.tags.get("wbsweep.kind") == "report"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one, also after a rerun or a report
    run_id = runs[0].info.run_id
    assert {"report.txt", "report.csv", "report_table.json"} <= {a.path for a in client.list_artifacts(run_id)}
    table = json.loads(Path(client.download_artifacts(run_id, "report_table.json", str(out / "dl"))).read_text())
    assert len(table["data"]) == 12 and "acc_avg_mean" in table["columns"]  # the 12 rows of Table 4, once
    # the UI opens the experiment on its runs (MLflow 3 otherwise shows its GenAI traces view)
    assert client.get_experiment_by_name("table4").tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_folder_files_are_stored_once(smoke):
    """With the local store, a model run's artifacts are hard links to its run folder's files."""
    out, client = smoke
    df = pd.read_parquet(out / "results").drop_duplicates(["config_hash", "seed"])
    for r in df.itertuples():
        folder = out / "runs" / r.config_hash / f"seed{r.seed}"
        artifacts = Path(client.get_run(r.mlflow_run_id).info.artifact_uri.removeprefix("file://"))
        for name in ("model.pt", "logits.npz", "metrics.json", "config.json"):
            assert (artifacts / name).samefile(folder / name), name
    inodes: dict[tuple[int, int], int] = {}
    for top in ("runs", "mlartifacts"):
        for path in (out / top).rglob("*"):
            if path.is_file() and "pytorch_model" not in path.parts:  # the MLflow models: another format
                st = path.stat()
                inodes[(st.st_dev, st.st_ino)] = st.st_size
    runs_bytes = sum(p.stat().st_size for p in (out / "runs").rglob("*") if p.is_file())
    assert sum(inodes.values()) - runs_bytes < 100_000  # mlartifacts/ adds the report's files only


def test_repeat_models_load_with_mlflow_pytorch(smoke, tmp_path):
    """A repeat-stage model run holds an MLflow PyTorch model with the weights of its model.pt."""
    import mlflow.pytorch
    import torch

    out, client = smoke
    df = pd.read_parquet(out / "results")
    runs = {r.info.run_id: r for r in runs_of(client, "table4")}
    trained = [r for r in df.itertuples() if runs[r.mlflow_run_id].data.tags["wbsweep.stage"] == "repeat"]
    assert trained
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    try:
        for r in (trained[0], trained[-1]):
            model = mlflow.pytorch.load_model(f"runs:/{r.mlflow_run_id}/pytorch_model", dst_path=str(tmp_path))
            saved = torch.load(out / "runs" / r.config_hash / f"seed{r.seed}" / "model.pt", weights_only=True)["model"]
            state = model.state_dict()
            assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    finally:
        mlflow.set_tracking_uri(before)
