"""The paper's claims tested on hand-made results with known means and stds: Welch's t, its degrees
of freedom and the 95 % interval against the textbook formulas, verdicts that flip where they
should, the paper's own numbers, the files and the MLflow run, and one-line errors."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from orchestrator.cli import main
from orchestrator.record.results import SCHEMA, write_rows
from orchestrator.report.claims import FAILS, FEW_SEEDS, HOLDS, NO_STD, claims_report, load_claims, welch_from_stats

# acc_avg per seed: means 52 and 49, both sample variances 2.5 (so Welch's t = 3, ν = 8 by hand)
OURS = [50.0, 52.0, 54.0, 53.0, 51.0]
WB = [48.0, 49.0, 50.0, 47.0, 51.0]

CLAIMS = """
claims:
  - name: ours_beats_wb
    text: ours > WB
    metric: acc_avg
    greater: {method: wd_fr_etf, la: mult}
    than: {method: wb}
  - name: wb_beats_ours
    text: WB > ours
    metric: acc_avg
    greater: {method: wb}
    than: {method: wd_fr_etf, la: mult}
  - name: ours_beats_wd_by_10x
    text: ours > 10x WD (train FDR)
    metric: fdr_train
    greater: {method: wd_fr_etf, la: mult}
    than: {method: wd}
    factor: 10
  - name: two_seeds
    text: ours > WD&ETF
    metric: acc_avg
    greater: {method: wd_fr_etf, la: mult}
    than: {method: wd_etf}
"""


def row(dataset: str, method: str, la: str, seed: int, acc: float, fdr: float = 1.0) -> dict:
    r = dict.fromkeys(SCHEMA.names)
    r.update(spec="table4", preset="cpu", dataset=dataset, model="mlp3", method=method, la=la, seed=seed,
             stage="repeat", config_hash=f"{method}-h", acc_avg=acc, fdr_train=fdr,
             created_at=pd.Timestamp("2026-01-01", tz="UTC"))
    return r


def write_results(out, spread: dict[str, float]) -> None:
    """Per dataset, the two groups at means 52 and 49 with their deviations scaled by ``spread``;
    WD's train FDR 100 (per seed 99..101) and ours 1500 ± 1.6; WD&ETF with two seeds."""
    rows = []
    for dataset, k in spread.items():
        for seed, (a, b) in enumerate(zip(OURS, WB, strict=True)):
            rows.append(row(dataset, "wd_fr_etf", "mult", seed, 52 + k * (a - 52), fdr=1500.0 + (a - 52)))
            rows.append(row(dataset, "wb", "none", seed, 49 + k * (b - 49)))
            rows.append(row(dataset, "wd", "none", seed, 40.0, fdr=100.0 + (b - 49) / 2))
        rows += [row(dataset, "wd_etf", "none", s, 30.0 + s) for s in (0, 1)]
    write_rows(out / "results", "hand-made", rows)


def test_welch_t_df_interval_and_p_match_the_formulas_and_verdicts_flip(tmp_path):
    write_results(tmp_path, {"tight": 1.0, "wide": 10.0})
    (tmp_path / "claims.yaml").write_text(CLAIMS)
    claims_report(tmp_path, "table4", None, tmp_path / "claims.yaml", paper_table=4)
    df = pd.read_parquet(tmp_path / "claims" / "table4-cpu.parquet")
    got = df.set_index(["claim", "dataset"])

    # Welch by hand: s² = 2.5 in both groups of 5; se = sqrt(2.5/5 + 2.5/5) = 1; t = 3 / 1;
    # ν = se⁴ / ((0.5²)/4 + (0.5²)/4) = 8; the interval 3 ± t(0.975, 8) · 1
    a, b = np.array(OURS), np.array(WB)
    va, vb = a.var(ddof=1) / 5, b.var(ddof=1) / 5
    assert va == vb == 0.5
    t_hand, df_hand = (a.mean() - b.mean()) / math.sqrt(va + vb), (va + vb) ** 2 / (va**2 / 4 + vb**2 / 4)
    assert (t_hand, df_hand) == (3.0, 8.0)
    r = got.loc[("ours_beats_wb", "tight")]
    assert r["t"] == pytest.approx(3.0, rel=1e-12) and r["df"] == pytest.approx(8.0, rel=1e-12)
    assert r["p"] == pytest.approx(2 * stats.t.sf(3.0, 8), rel=1e-9)  # 0.0171
    assert r["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    half = stats.t.ppf(0.975, 8)  # 2.306
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert (r["mean_a"], r["mean_b"], r["n_a"], r["n_b"]) == (52.0, 49.0, 5, 5)
    assert r["verdict"] == HOLDS

    # the same difference with ten times the spread: t = 0.3, the interval covers 0
    wide = got.loc[("ours_beats_wb", "wide")]
    assert wide["t"] == pytest.approx(0.3) and wide["ci_low"] < 0 < wide["ci_high"] and wide["verdict"] == FAILS
    # the reversed claim: t = -3, does not hold
    rev = got.loc[("wb_beats_ours", "tight")]
    assert rev["t"] == pytest.approx(-3.0) and rev["verdict"] == FAILS
    # A > 10 × B: 1500 vs 10 × 100 (WD's values scaled by 10 before the test)
    fdr = got.loc[("ours_beats_wd_by_10x", "tight")]
    assert fdr["diff"] == pytest.approx(500.0) and fdr["mean_b"] == pytest.approx(100.0)
    sa, sb = np.var(a - 52 + 1500, ddof=1) / 5, np.var(10 * (100 + (b - 49) / 2), ddof=1) / 5
    assert fdr["t"] == pytest.approx(500 / math.sqrt(sa + sb)) and fdr["verdict"] == HOLDS
    # WD&ETF has two seeds: below min_seeds (3)
    assert got.loc[("two_seeds", "tight")]["verdict"] == FEW_SEEDS
    assert got.loc[("two_seeds", "tight")]["n_b"] == 2

    # the paper's Table 4: 53.0 ± 0.3 vs 50.6 ± 0.2 over 5 seeds, by hand
    se = math.sqrt(0.3**2 / 5 + 0.2**2 / 5)
    assert r["paper_t"] == pytest.approx(2.4 / se) and r["paper_verdict"] == HOLDS
    nu = (se**2) ** 2 / ((0.09 / 5) ** 2 / 4 + (0.04 / 5) ** 2 / 4)
    assert r["paper_p"] == pytest.approx(2 * stats.t.sf(2.4 / se, nu))
    assert fdr["paper_verdict"] == NO_STD  # Table 4 prints no std for FDR
    # the CSV beside it holds the same rows
    csv = pd.read_csv(tmp_path / "claims" / "table4-cpu.csv")
    assert len(csv) == len(df) == 8 and list(csv["verdict"]) == list(df["verdict"])


def test_the_papers_own_numbers_hold_or_not(capsys):
    # Table 9 (mini-ImageNet-LT): ours 54.2 ± 0.5 vs WB 54.8 ± 0.3 does not hold; Table 10 holds
    st = welch_from_stats(54.2, 0.5, 5, 54.8, 0.3, 5)
    assert st["diff"] == pytest.approx(-0.6) and st["t"] == pytest.approx(-0.6 / math.sqrt(0.25 / 5 + 0.09 / 5))
    assert main(["report", "table9", "--claims", "--paper"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("WD&FR&ETF + mult LA > WB"))
    assert "does not hold (mini-imagenet-lt)" in line and "-0.60" in line
    assert main(["report", "table10", "--claims", "--paper", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert table.set_index("claim").loc["ours_beats_wb", "paper_verdict"] == HOLDS


def test_claims_go_to_mlflow(tmp_path):
    from mlflow import MlflowClient

    write_results(tmp_path, {"tight": 1.0})
    (tmp_path / "claims.yaml").write_text(CLAIMS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = claims_report(tmp_path, "table4", None, tmp_path / "claims.yaml", paper_table=4, tracking_uri=uri)
    assert "claims logged to MLflow" in text
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("table4").experiment_id],
                              filter_string="tags.`wbsweep.kind` = 'claims'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["claim.ours_beats_wb"] == 1.0 and runs[0].data.metrics["claim.two_seeds"] == -1.0
    assert {"claims.json", "claims.csv", "claims.yaml"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    # and in the spec-level run of the report: one, its table replaced (not appended to) by a second report
    claims_report(tmp_path, "table4", None, tmp_path / "claims.yaml", paper_table=4, tracking_uri=uri)
    (again,) = client.search_runs([client.get_experiment_by_name("table4").experiment_id],
                                  filter_string="tags.`wbsweep.kind` = 'claims'")  # the same run, re-attached
    assert again.info.run_id == runs[0].info.run_id and again.data.tags["mlflow.source.type"] == "LOCAL"
    claims_json = json.loads(Path(client.download_artifacts(again.info.run_id, "claims.json",
                                                            str(tmp_path / "again"))).read_text())
    assert len(claims_json["data"]) == len(pd.read_csv(tmp_path / "claims" / "table4-cpu.csv"))
    (report,) = client.search_runs([client.get_experiment_by_name("table4").experiment_id],
                                   filter_string="tags.`wbsweep.kind` = 'report'")
    table = json.loads(Path(client.download_artifacts(report.info.run_id, "claims_table.json",
                                                      str(tmp_path))).read_text())
    assert len(table["data"]) == len(pd.read_csv(tmp_path / "claims" / "table4-cpu.csv"))


BAD = {
    "unknown_group": ("claims:\n  - {name: x, metric: acc_avg, greater: {method: wd_fr_ef}, than: {method: wb}}\n",
                      "unknown method 'wd_fr_ef'"),
    "malformed": ("claims: [name: x\n", "cannot read claims file"),
    "duplicate_key": ("claims:\n  - name: x\n    metric: acc_avg\n    greater: {method: wd}\n"
                      "    than: {method: wb}\n    metric: fdr_test\n",
                      "c.yaml:6:5: key 'metric' is given twice (also on line 3)"),
    "no_list": ("min_seeds: 3\n", "non-empty list 'claims'"),
    "metric": ("claims:\n  - {name: x, metric: acc, greater: {method: wd}, than: {method: wb}}\n",
               "unknown metric 'acc'"),
    "classes": ("claims:\n  - {name: x, metric: feature_norms.norms, greater: {method: wd}, than: {method: wb}}\n",
                "needs classes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_claims_file_is_one_line(tmp_path, capsys, case):
    text, words = BAD[case]
    (tmp_path / "c.yaml").write_text(text)
    assert main(["report", "table4", "--claims", str(tmp_path / "c.yaml"), "--paper"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("wbsweep: error:") and words in lines[0], err
    with pytest.raises(Exception, match="claims file"):
        load_claims(tmp_path / "c.yaml")


def test_missing_claims_file_and_missing_results_are_one_line(tmp_path, capsys):
    assert main(["report", "table4", "--claims", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", "table7", "--claims", "--out", str(tmp_path)]) == 2  # table7 has no claims file
    assert "has no claims file" in capsys.readouterr().err
    assert main(["report", "table4", "--claims", "--out", str(tmp_path)]) == 2  # no results yet
    assert "--paper" in capsys.readouterr().err


def test_every_shipped_claims_file_loads_and_names_methods_of_its_spec():
    from orchestrator.report.claims import default_path
    from orchestrator.spec.experiment import find_spec, load_experiment, spec_names

    found = 0
    for name in spec_names():
        path = default_path(find_spec(name), name)
        if not path.is_file():
            continue
        found += 1
        methods = {m.method.name for m in load_experiment(name).methods}
        for claim in load_claims(path).claims:
            assert {claim.greater["method"], claim.than["method"]} <= methods, (name, claim.name)
    assert found >= 6
