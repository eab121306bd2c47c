"""The report layouts beyond Table 4's: Table 2 (FDR per dataset), Table 3 (FDR before/after a random
layer, from the analyses dataset), the figures, and LaTeX for each, built from hand-made rows."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from orchestrator.record.analyses import read_analysis_rows, rows_for_result, write_analysis_rows
from orchestrator.record.results import rows_for_run, write_rows
from orchestrator.report.tables import report
from orchestrator.spec.paper import paper_reference
from trainables.config import resolve_config
from trainables.errors import WbsweepError

VERSIONS = {"wbsweep": "0.1.0", "torch": "2.x", "ray": "2.x"}


def add_model(out, spec, method, dataset, model, seed, fdr_train, fdr_test, hash_, analyses=None):
    cfg = resolve_config({"dataset": dataset, "model": model, "la": ["none"]})
    metrics = {"config_hash": hash_, "fdr_train": fdr_train, "fdr_test": fdr_test, "objective": 50.0, "epochs": 2,
               "best_epoch": 2, "train_seconds": 1.0, "node": "n", "device": "cpu",
               "la": {"none": {"param": None, "val_acc": 50.0, "many": 60.0, "medium": 50.0, "few": 40.0,
                               "avg": 50.0, "acc_per_class": [50.0] * 3}}}
    rows = rows_for_run(metrics, {**cfg, "seed": seed}, spec=spec, preset="paper", method=method, stage="repeat",
                        mlflow_run_id=None, versions=VERSIONS, created_at=pd.Timestamp("2026-01-01", tz="UTC"))
    write_rows(out / "results", f"{spec}-{method}-{hash_}-s{seed}", rows)
    if analyses is not None:
        result = {"config_hash": hash_, "seed": seed, "dataset": dataset, "model": model,
                  "class_counts": [300, 60, 10], "analyses": analyses}
        write_analysis_rows(out / "analyses", f"{spec}-{method}-{hash_}-s{seed}",
                            rows_for_result(result, spec=spec, preset="paper", method=method))


def test_table2_layout_with_the_papers_values(tmp_path):
    for d, base in (("cifar10-lt", 10.0), ("cifar100-lt", 100.0)):
        for method in ("naive", "wd", "wd_fixbn"):
            for seed in (0, 1):
                add_model(tmp_path, "table2", method, d, "resnet34", seed, 1000 * base + seed * 2, base + seed * 2,
                          f"{method}{d}")
    csv = pd.read_csv(io.StringIO(report(tmp_path, "table2", fmt="csv", layout="fdr")))
    row = csv[(csv.method == "wd") & (csv.dataset == "cifar100-lt")].iloc[0]
    assert row["fdr_test_mean"] == pytest.approx(101.0) and row["fdr_test_std"] == pytest.approx(np.sqrt(2), rel=1e-5)
    assert row["paper_fdr_train"] == pytest.approx(28700.0) and row["paper_fdr_test"] == pytest.approx(107.0)
    text = report(tmp_path, "table2", fmt="table", layout="fdr", method_order=["naive", "wd", "wd_fixbn"])
    lines = text.splitlines()
    assert "cifar10-lt (resnet34) train" in lines[1] and "cifar100-lt (resnet34) test" in lines[1]
    wd = next(i for i, ln in enumerate(lines) if ln.startswith("WD "))
    assert "101.0 ± 1.4" in lines[wd] and "paper" in lines[wd + 1] and "2.87e+04" in lines[wd + 1]
    assert lines.index(next(ln for ln in lines if ln.startswith("Naive"))) < wd  # the spec's method order
    assert "ResNet34" in text
    tex = report(tmp_path, "table2", fmt="latex", layout="fdr")
    assert "\\begin{tabular}" in tex and "$\\pm$" in tex and "\\textit{" in tex and tex.count("\\\\") >= 7


def cosine(c, diag, off):
    m = np.full((c, c), off)
    np.fill_diagonal(m, diag)
    return m.tolist()


def test_table3_layout_from_the_analyses(tmp_path):
    for method, (before, after) in {"naive": (40.0, 38.0), "wd": (100.0, 120.0)}.items():
        for seed in (0, 1):
            add_model(tmp_path, "table3", method, "cifar100-lt", "resnet34", seed, 1.0, before, f"h{method}",
                      {"fdr_random_layer": {"before_test": before + seed, "after_test": after + seed,
                                            "before_train": 1.0, "after_train": 2.0}})
    df = read_analysis_rows(tmp_path / "analyses")
    assert set(df["key"]) == {"before_test", "after_test", "before_train", "after_train"}
    text = report(tmp_path, "table3", layout="fdr_random_layer", method_order=["naive", "wd_nobn", "wd"])
    lines = text.splitlines()
    assert "Naive before" in lines[1] and "WD after" in lines[1] and "WD w/o BN" not in lines[1]
    ours = next(ln for ln in lines if ln.startswith("resnet34"))
    assert "40.5 ± 0.7" in ours and "120.5 ± 0.7" in ours
    paper = lines[lines.index(ours) + 1]
    assert "paper" in paper and "41.6" in paper and "113.0" in paper  # Table 3: C100-LT naive 41.6, WD after 113
    tex = report(tmp_path, "table3", fmt="latex", layout="fdr_random_layer")
    assert "\\begin{tabular}{llrrrr}" in tex


def test_table3_without_analyses_says_how_to_compute_them(tmp_path):
    add_model(tmp_path, "table3", "wd", "digits", "mlp3", 0, 1.0, 2.0, "h")
    with pytest.raises(WbsweepError, match="wbsweep analyze --spec table3"):
        report(tmp_path, "table3", layout="fdr_random_layer")


def test_figure_layout_writes_pngs_and_summarises(tmp_path):
    counts = [300, 60, 10]
    for method, (intra, inter, norms, ratio) in {
        "naive": (0.9, 0.8, [1.0, 1.0, 1.0], [1.0, 1.1, 1.2]),
        "wd": (0.8, 0.1, [1.0, 2.0, 3.0], [1.0, 0.9, 0.8]),
    }.items():
        for seed in (0, 1):
            add_model(tmp_path, "figx", method, "cifar100-lt", "resnet34", seed, 1.0, 1.0, f"h{method}", {
                "class_cosine": {"matrix": cosine(3, intra, inter)},
                "feature_norms": {"norms": norms},
                "weight_norms": {"norms": ratio, "ratio": ratio},
                "forgetting": {"mean": [0.5, 1.0, 2.0], "never_learned": [0.0, 0.1, 0.5],
                               "unforgettable": [0.5, 0.2, 0.0], "count": counts, "epochs": 2},
                "relu_fdr": {"split": "test", "layers": ["1:Linear", "2:BatchNorm1d"], "trained": [5.0, 4.0],
                             "untrained": [2.0, 2.0]},
            })
    text = report(tmp_path, "figx", layout="figure", method_order=["naive", "wd"])
    figs = sorted((tmp_path / "figures").glob("*.png"))
    assert len(figs) == 5 and all(p.stat().st_size > 5000 for p in figs)
    assert all(f"figure: {p}" in text for p in figs)
    cos = text[text.index("mean cosine"):]
    assert "0.900" in cos and "0.100" in cos  # intra of naive, inter of wd
    norms = text[text.index("norm of the per-class mean"):].splitlines()
    wd = next(ln for ln in norms if ln.startswith("WD "))
    # cifar100 groups: 300 images many, 60 medium, 10 few
    assert wd.split()[1:4] == ["1.0", "2.0", "3.0"]
    forget = text[text.index("forgetting score per class"):]
    assert "never learned" in forget and "20.0%" in forget
    assert "untrained" in text and "Layer" in text
    csv = pd.read_csv(io.StringIO(report(tmp_path, "figx", fmt="csv", layout="figure")))
    cell = csv[(csv.analysis == "class_cosine") & (csv.method == "wd") & (csv.i == 0) & (csv.j == 1)]
    assert cell["mean"].item() == pytest.approx(0.1) and cell["count"].item() == 2
    tex = report(tmp_path, "figx", fmt="latex", layout="figure")
    assert "\\includegraphics" in tex and "\\begin{tabular}" in tex


def test_reference_csvs_hold_tables_2_3_and_8_to_10():
    acc = paper_reference()
    assert {2, 3} .isdisjoint(set(acc["table"])) and {4, 6, 7, 8, 9, 10} <= set(acc["table"])
    assert len(paper_reference("paper_table2_fdr.csv")) == 18
    assert len(paper_reference("paper_table3_fdr_random_layer.csv")) == 33


def test_accuracy_layout_with_variants_groups_rows_and_latex(tmp_path):
    add_model(tmp_path, "t", "wd", "digits-lt", "mlp3", 0, 1.0, 2.0, "a")
    add_model(tmp_path, "t", "wd", "digits", "mlp3", 0, 1.0, 2.0, "b")
    text = report(tmp_path, "t")
    assert "[digits-lt, mlp3]" in text and "[digits, mlp3]" in text
    tex = report(tmp_path, "t", fmt="latex")
    assert "\\multicolumn" in tex and "\\toprule" in tex and "WD" in tex
