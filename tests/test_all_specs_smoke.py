"""Every spec of the paper at `smoke` scale, end to end through the CLI: `wbsweep run NAME --preset
smoke` (a real local Ray cluster, Optuna, MLflow, Parquet) exits 0, then `wbsweep report NAME` prints
its table or writes its figures, and `wbsweep analyze` recomputes analyses from the checkpoints.

The specs run in this one process, one after the other, into one results folder, so Ray starts once
and later specs reuse earlier models where the configs agree (fig3 and fig5 reuse fig1's models and
compute their own analyses from the checkpoints). Marked slow; CI runs it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.record.analyses import read_analysis_rows
from orchestrator.record.results import read_rows
from orchestrator.spec.experiment import load_experiments

pytestmark = pytest.mark.slow

SPECS = ["table2", "table3", "table4", "table6", "table7", "table8", "table9", "table10",
         "fig1", "fig2", "fig3", "fig4", "fig5", "fig6"]
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("all-specs")
    yield folder
    import ray

    if ray.is_initialized():
        ray.shutdown()
    print("\nsmoke run seconds per spec: " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))


def smoke_models(out: Path, spec: str):
    return read_rows(out / "results").query("spec == @spec and preset == 'smoke'")


@pytest.mark.parametrize("spec", SPECS)
def test_smoke_run_and_report(spec: str, out: Path, capsys: pytest.CaptureFixture) -> None:
    started = time.time()
    rc = main(["run", spec, "--preset", "smoke", "--out", str(out), "--quiet"])
    TIMINGS[spec] = time.time() - started
    run = capsys.readouterr()
    assert rc == 0, run.err[-4000:] + run.out[-2000:]
    exps = load_experiments(spec, "smoke")
    exp = exps[0]
    rows = smoke_models(out, spec)
    # one row per variant x method x LA x seed
    expected = len(exps) * sum(len(m.la) for m in exp.methods) * len(exp.seeds)
    assert len(rows) == expected
    assert set(zip(rows["dataset"], rows["model"], strict=True)) == {
        (e.train["dataset"], e.train["model"]) for e in exps}

    assert main(["report", spec, "--out", str(out), "--preset", "smoke"]) == 0
    text = capsys.readouterr().out
    assert text == run.out[: len(text)] or exp.layout == "figure"  # `run` ended with the same report
    labels = [m.method.label for m in exp.methods]
    wanted = sorted({a for e in exps for a in e.train.get("analyses", [])})
    if exp.layout in ("accuracy", "fdr"):
        assert all(label in text for label in labels), text
        assert "±" in text or len(exp.seeds) == 1
    if wanted:  # every model of the spec has its analyses as rows, whoever trained it
        a = read_analysis_rows(out / "analyses").query("spec == @spec")
        have = set(zip(a["config_hash"], a["seed"], a["analysis"], strict=True))
        for _, r in rows.drop_duplicates(["config_hash", "seed"]).iterrows():
            for name in wanted:
                if name == "forgetting" and r["method"] in ("wb", "wd_norm_cb"):
                    continue
                assert (r["config_hash"], r["seed"], name) in have, (spec, r["method"], name)
    if exp.layout == "fdr_random_layer":
        assert "before" in text and all(f"{label} after" in text for label in labels)
        assert all(e.train["model"] in text for e in exps)
    if exp.layout == "figure":
        figures = [Path(ln.split("figure: ", 1)[1]) for ln in text.splitlines() if ln.startswith("figure: ")]
        assert len(figures) == len(wanted) * len(exps), text
        assert all(p.is_file() and p.stat().st_size > 5000 and p.parent == out / "figures" for p in figures)
        assert all(label in text for label in labels if label != "WD&Norm&CB" or "weight_norms" in wanted)
    assert main(["report", spec, "--out", str(out), "--preset", "smoke", "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert "\\begin{tabular}" in tex and "\\end{table}" in tex


def test_models_log_their_analyses_to_mlflow(out: Path) -> None:
    from mlflow import MlflowClient

    rows = smoke_models(out, "fig1")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run_id = rows["mlflow_run_id"].dropna().iloc[0]
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"analysis.json", "analysis-class_cosine.png", "model.pt"} <= arts


def test_analyze_recomputes_from_checkpoints(out: Path, capsys: pytest.CaptureFixture) -> None:
    rows = smoke_models(out, "table6")
    folder = out / "runs" / rows["config_hash"].iloc[0] / f"seed{rows['seed'].iloc[0]}"
    assert not (folder / "analysis.json").exists()  # table6 asks for none
    assert main(["analyze", "--out", str(out), "--spec", "table6", "--names", "weight_norms", "feature_norms"]) == 0
    assert "2 of 2 model(s) analysed" in capsys.readouterr().out
    assert set(json.loads((folder / "analysis.json").read_text())["analyses"]) == {"weight_norms", "feature_norms"}
    a = read_analysis_rows(out / "analyses").query("spec == 'table6'")
    assert set(a["analysis"]) == {"weight_norms", "feature_norms"}
    assert main(["analyze", "--out", str(out), "--spec", "table6", "--names", "weight_norms", "--missing"]) == 0
    assert "0 of 2 model(s) analysed" in capsys.readouterr().out
    assert main(["analyze", "--out", str(out), "--spec", "nope"]) == 2
