"""The paper's claims as data, tested on a sweep's results and on the paper's own numbers.

A claims file (``search_spaces/claims/<spec>.yaml``, or any path given to ``wbsweep report SPEC
--claims PATH``) lists directional claims, each "group A is greater than ``factor`` × group B on a
metric"::

    min_seeds: 3                      # fewer seeds in a group: "not enough seeds" (default 3)
    claims:
      - name: ours_beats_wb
        text: WD&FR&ETF + mult LA > WB on average accuracy
        source: "Sec. 5.2: WD&FR&ETF&Multiplicative LA outperformed WB on average accuracy"
        metric: acc_avg               # a results column, or ANALYSIS.KEY (feature_norms.norms)
        greater: {method: wd_fr_etf, la: mult}
        than: {method: wb}            # la defaults to none; dataset, model narrow a group
        factor: 1                     # optional: A > factor × B ("more than 10x": factor 10)

A group of an analysis metric names the classes it averages (``classes: few``; ``many``,
``medium``, ``all``): per seed, the mean over those classes of the analysis's per-class values.

Statistics, per claim and (dataset, model) of the results. With a = the per-seed values of A and
b = ``factor`` × those of B (one value per seed and group), the difference d = mean(a) − mean(b),
its standard error s = sqrt(s_a²/n_a + s_b²/n_b) (sample variances) and Welch–Satterthwaite degrees
of freedom ν = s⁴ / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1)) (Welch 1947, Biometrika 34:28;
Satterthwaite 1946), the 95 % confidence interval is d ± t₀.₉₇₅,ν · s and the test is Welch's
two-sided t-test, t = d / s (``scipy.stats.ttest_ind(a, b, equal_var=False)``). A claim *holds*
when the interval lies wholly above 0 (equivalently p < 0.05 and d > 0), *does not hold*
otherwise, and has *not enough seeds* when either group has fewer than ``min_seeds``. Seeds are
treated as independent samples (the methods' seeds are not paired).

The paper's numbers (``orchestrator/spec/reference/*.csv``: mean ± std over the paper's five seeds,
appendix 7.5.3; the std read as the sample std) give the same test from the summary statistics
(``scipy.stats.ttest_ind_from_stats``); where the paper printed no std, only the difference is shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from trainables.errors import WbsweepError

HOLDS, FAILS, FEW_SEEDS, NO_STD = "holds", "does not hold", "not enough seeds", "no std in paper"
MIN_SEEDS = 3
LEVEL = 0.95
#: The paper's numbers are means over five seeds (appendix 7.5.3).
PAPER_SEEDS = 5
GROUP_KEYS = {"method", "la", "dataset", "model", "classes"}
CLAIM_KEYS = {"name", "text", "source", "metric", "greater", "than", "factor"}
CLASS_GROUPS = ("many", "medium", "few", "all")
#: Results columns a claim may compare (numbers per model and LA).
RESULT_METRICS = ("acc_many", "acc_medium", "acc_few", "acc_avg", "val_acc", "fdr_train", "fdr_test")


@dataclass
class Claim:
    name: str
    text: str
    metric: str
    greater: dict[str, str]
    than: dict[str, str]
    factor: float = 1.0
    source: str = ""

    @property
    def analysis(self) -> tuple[str, str] | None:
        """(analysis, key) for an analysis metric such as ``feature_norms.norms``; None for a results column."""
        if "." not in self.metric:
            return None
        analysis, key = self.metric.split(".", 1)
        return analysis, key


@dataclass
class Claims:
    claims: list[Claim]
    min_seeds: int = MIN_SEEDS
    path: str = ""


def default_path(spec_file: Path, name: str) -> Path:
    """Where a spec's claims live: ``claims/<name>.yaml`` beside the spec file."""
    return spec_file.parent / "claims" / f"{name}.yaml"


def _group(raw: Any, where: str, analysis: bool) -> dict[str, str]:
    if not isinstance(raw, dict) or "method" not in raw:
        raise WbsweepError(f"{where}: a group is a mapping with at least 'method' (e.g. {{method: wd, la: mult}}).")
    unknown = set(raw) - GROUP_KEYS
    if unknown:
        raise WbsweepError(f"{where}: unknown group key(s) {', '.join(sorted(unknown))}; use "
                           f"{', '.join(sorted(GROUP_KEYS))}.")
    group = {k: str(v) for k, v in raw.items()}
    group.setdefault("la", "none")
    if analysis:
        if group.get("classes") not in CLASS_GROUPS:
            raise WbsweepError(f"{where}: an analysis metric's group needs classes: one of {', '.join(CLASS_GROUPS)}.")
    elif "classes" in group:
        raise WbsweepError(f"{where}: 'classes' applies to analysis metrics (ANALYSIS.KEY), not to a results column.")
    return group


def load_claims(path: str | Path) -> Claims:
    """Read and check a claims file; a mistake in it is one :class:`WbsweepError` line naming the file."""
    from orchestrator.spec.yaml_loader import describe
    from orchestrator.spec.yaml_loader import load as load_yaml
    from trainables.methods import METHODS

    path = Path(path)
    if not path.is_file():
        raise WbsweepError(f"claims file {path} does not exist; write one (docs/claims.md) or give its path "
                           "with --claims PATH.")
    try:
        doc = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise WbsweepError(f"cannot read claims file {describe(exc, path)}.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("claims"), list) or not doc["claims"]:
        raise WbsweepError(f"claims file {path} must be a mapping with a non-empty list 'claims'.")
    min_seeds = doc.get("min_seeds", MIN_SEEDS)
    if not isinstance(min_seeds, int) or isinstance(min_seeds, bool) or min_seeds < 2:
        raise WbsweepError(f"claims file {path}: min_seeds must be an integer of at least 2 (Welch's test needs a "
                           "variance per group).")
    claims, names = [], set()
    for k, raw in enumerate(doc["claims"], 1):
        where = f"claims file {path}, claim {k}"
        if not isinstance(raw, dict):
            raise WbsweepError(f"{where}: a claim is a mapping (name, text, metric, greater, than).")
        missing = {"name", "metric", "greater", "than"} - set(raw)
        if missing:
            raise WbsweepError(f"{where}: missing {', '.join(sorted(missing))}.")
        unknown = set(raw) - CLAIM_KEYS
        if unknown:
            raise WbsweepError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use "
                               f"{', '.join(sorted(CLAIM_KEYS))}.")
        name = str(raw["name"])
        where = f"claims file {path}, claim '{name}'"
        if name in names:
            raise WbsweepError(f"{where}: the name is used twice.")
        names.add(name)
        metric = str(raw["metric"])
        analysis = "." in metric
        if not analysis and metric not in RESULT_METRICS:
            raise WbsweepError(f"{where}: unknown metric '{metric}'; use {', '.join(RESULT_METRICS)} or "
                               "ANALYSIS.KEY (e.g. feature_norms.norms).")
        factor = raw.get("factor", 1)
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
            raise WbsweepError(f"{where}: factor must be a positive number.")
        groups = [_group(raw[side], f"{where}, '{side}'", analysis) for side in ("greater", "than")]
        for side, g in zip(("greater", "than"), groups, strict=True):
            if g["method"] not in METHODS:
                from trainables.errors import unknown_name

                raise WbsweepError(f"{where}, '{side}': {unknown_name('method', g['method'], list(METHODS), '')}")
            if g["la"] not in ("none", "add", "mult"):
                raise WbsweepError(f"{where}, '{side}': la must be none, add or mult, not '{g['la']}'.")
        claims.append(Claim(name=name, text=str(raw.get("text", name)), metric=metric, greater=groups[0],
                            than=groups[1], factor=float(factor), source=str(raw.get("source", ""))))
    return Claims(claims=claims, min_seeds=min_seeds, path=str(path))


# --- statistics -------------------------------------------------------------------------------------


def welch(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> dict[str, float]:
    """Welch's unequal-variance comparison of the samples ``a`` and ``b``: difference of means, its
    ``level`` confidence interval (Welch–Satterthwaite ν), t and the two-sided p-value
    (``scipy.stats.ttest_ind(equal_var=False)``). NaN where a group has fewer than two values."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        d = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
        return {"diff": d, "ci_low": math.nan, "ci_high": math.nan, "t": math.nan, "df": math.nan, "p": math.nan}
    res = stats.ttest_ind(a, b, equal_var=False)
    return _interval(float(a.mean()), float(a.std(ddof=1)), len(a), float(b.mean()), float(b.std(ddof=1)), len(b),
                     float(res.statistic), float(res.pvalue), level)


def welch_from_stats(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int,
                     level: float = LEVEL) -> dict[str, float]:
    """:func:`welch` from means, sample stds and counts (``scipy.stats.ttest_ind_from_stats``)."""
    from scipy import stats

    res = stats.ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False)
    return _interval(mean_a, std_a, n_a, mean_b, std_b, n_b, float(res.statistic), float(res.pvalue), level)


def _interval(ma: float, sa: float, na: int, mb: float, sb: float, nb: int, t: float, p: float,
              level: float) -> dict[str, float]:
    from scipy import stats

    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    d = ma - mb
    if se == 0:  # no spread at all: the sign of the difference decides, no test
        return {"diff": d, "ci_low": d, "ci_high": d, "t": math.nan, "df": math.nan, "p": math.nan}
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return {"diff": d, "ci_low": d - half, "ci_high": d + half, "t": t, "df": df, "p": p}


def verdict(stats_: dict[str, float], n_a: int, n_b: int, min_seeds: int) -> str:
    """holds (the interval lies above 0), does not hold, or not enough seeds (either group < ``min_seeds``)."""
    if min(n_a, n_b) < min_seeds:
        return FEW_SEEDS
    return HOLDS if stats_["ci_low"] > 0 else FAILS


# --- per-seed values --------------------------------------------------------------------------------


def _select(df: pd.DataFrame, group: dict[str, str], keys: tuple[str, ...]) -> pd.DataFrame:
    for k in keys:
        if k in group:
            df = df[df[k] == group[k]]
    return df


def seed_values(rows: pd.DataFrame, claim: Claim, group: dict[str, str], analyses: pd.DataFrame | None) -> pd.Series:
    """Per seed, the claim's metric for ``group`` within ``rows`` (one dataset and model)."""
    if claim.analysis is None:
        sel = _select(rows, group, ("method", "la", "dataset", "model")).drop_duplicates("seed")
        return sel.set_index("seed")[claim.metric].astype(float).dropna()
    from orchestrator.report.tables import _group_of

    analysis, key = claim.analysis
    if analysis == "" or analyses is None or analyses.empty:
        return pd.Series(dtype=float)
    a = _select(analyses, group, ("method", "dataset", "model"))
    a = a[a["analysis"] == analysis]
    out = {}
    for seed, s in a.groupby("seed"):
        vals = s[s["key"] == key].sort_values("i")
        counts = s[s["key"] == "class_count"].sort_values("i")
        if vals.empty:
            continue
        v = vals["value"].to_numpy(dtype=np.float64)
        if group["classes"] == "all":
            out[seed] = float(np.nanmean(v))
            continue
        if len(counts) != len(v):
            continue
        grp = _group_of(counts["value"].to_numpy(), str(s["dataset"].iloc[0]))
        sel = grp == group["classes"]
        if sel.any():
            out[seed] = float(np.nanmean(v[sel]))
    return pd.Series(out, dtype=float)


def _label(group: dict[str, str]) -> str:
    from orchestrator.report.tables import _label as method_label

    text = method_label(group["method"])
    if group.get("la", "none") != "none":
        text += f" + {group['la']} LA"
    if group.get("classes"):
        text += f" ({group['classes']})"
    for k in ("dataset", "model"):
        if k in group:
            text += f" [{group[k]}]"
    return text


def evaluate(claims: Claims, rows: pd.DataFrame | None, analyses: pd.DataFrame | None = None,
             paper_table: int | None = None) -> pd.DataFrame:
    """One row per claim and (dataset, model) of ``rows`` (one spec and preset; None: the paper's
    numbers only), with the groups' statistics, the test, the verdict, and the same for the paper's
    numbers of ``paper_table``."""
    out = []
    pairs = list(dict.fromkeys(zip(rows["dataset"], rows["model"], strict=True))) if rows is not None else [None]
    for claim in claims.claims:
        for pair in pairs:
            rec: dict[str, Any] = {
                "claim": claim.name, "text": claim.text, "metric": claim.metric, "group_a": _label(claim.greater),
                "group_b": _label(claim.than), "factor": claim.factor, "dataset": None, "model": None,
                "n_a": 0, "n_b": 0, "mean_a": math.nan, "std_a": math.nan, "mean_b": math.nan, "std_b": math.nan,
                "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "t": math.nan, "df": math.nan,
                "p": math.nan, "verdict": None, "min_seeds": claims.min_seeds, "source": claim.source,
            }
            if pair is not None:
                dataset, model = pair
                if any(k in g and g[k] != v for g in (claim.greater, claim.than)
                       for k, v in (("dataset", dataset), ("model", model))):
                    continue  # the claim is about another dataset or model
                sub = rows[(rows["dataset"] == dataset) & (rows["model"] == model)]
                sub_a = analyses[(analyses["dataset"] == dataset) & (analyses["model"] == model)] \
                    if analyses is not None and not analyses.empty else analyses
                a = seed_values(sub, claim, claim.greater, sub_a)
                b = seed_values(sub, claim, claim.than, sub_a) * claim.factor
                st = welch(a.to_numpy(), b.to_numpy()) if len(a) and len(b) else None
                rec.update(dataset=dataset, model=model, n_a=len(a), n_b=len(b),
                           mean_a=float(a.mean()) if len(a) else math.nan,
                           std_a=float(a.std(ddof=1)) if len(a) > 1 else math.nan,
                           mean_b=float(b.mean()) / claim.factor if len(b) else math.nan,
                           std_b=float(b.std(ddof=1)) / claim.factor if len(b) > 1 else math.nan)
                if st is not None:
                    rec.update(st)
                rec["verdict"] = verdict(rec, len(a), len(b), claims.min_seeds) if st is not None else FEW_SEEDS
            rec.update(paper_claim(claim, paper_table, claims.min_seeds))
            out.append(rec)
    return pd.DataFrame(out)


def paper_claim(claim: Claim, table: int | None, min_seeds: int = MIN_SEEDS) -> dict[str, Any]:
    """The claim tested on the paper's numbers of ``table`` (its first matching dataset and model)."""
    empty = {"paper_table": table, "paper_dataset": None, "paper_mean_a": math.nan, "paper_mean_b": math.nan,
             "paper_diff": math.nan, "paper_ci_low": math.nan, "paper_ci_high": math.nan, "paper_t": math.nan,
             "paper_p": math.nan, "paper_verdict": None}
    if table is None or claim.analysis is not None:
        return empty
    from orchestrator.report.tables import TABLE2_METHODS
    from orchestrator.spec.paper import paper_reference

    if table == 2:  # Table 2's own file: FDR per method and dataset, no LA, no std
        ref = paper_reference("paper_table2_fdr.csv")
        ref["method"] = ref["method"].map(TABLE2_METHODS)
        keys: tuple[str, ...] = ("method", "dataset")
        if claim.metric not in ref.columns:
            return empty
    else:
        ref = paper_reference()
        ref = ref[ref["table"] == table]
        keys = ("method", "la", "dataset")
    sides = []
    for g in (claim.greater, claim.than):
        r = _select(ref, g, keys)
        if "dataset" not in g and len(sides):  # B from A's dataset (Table 2 has three)
            r = r[r["dataset"] == sides[0]["dataset"]]
        if r.empty:
            return empty
        sides.append(r.iloc[0])
    a, b = sides
    f = claim.factor
    ma, sa, mb, sb = (float(a[claim.metric]), float(a.get(f"{claim.metric}_std", math.nan)),
                      float(b[claim.metric]), float(b.get(f"{claim.metric}_std", math.nan)))
    rec = {**empty, "paper_dataset": a["dataset"], "paper_mean_a": ma, "paper_mean_b": mb, "paper_diff": ma - f * mb}
    if math.isnan(sa) or math.isnan(sb):
        rec["paper_verdict"] = NO_STD
        return rec
    st = welch_from_stats(ma, sa, PAPER_SEEDS, f * mb, f * sb, PAPER_SEEDS)
    rec.update({f"paper_{k}": v for k, v in st.items() if k != "df"})
    rec["paper_verdict"] = verdict(st, PAPER_SEEDS, PAPER_SEEDS, min_seeds)
    return rec


# --- output -----------------------------------------------------------------------------------------


def _g(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}" if abs(v) >= 1000 or (v != 0 and abs(v) < 0.01) else f"{v:.2f}"


def _ci(r: pd.Series, prefix: str = "") -> str:
    d, lo, hi = r[f"{prefix}diff"], r[f"{prefix}ci_low"], r[f"{prefix}ci_high"]
    if isinstance(d, float) and math.isnan(d):
        return "-"
    return _g(d) if math.isnan(lo) else f"{_g(d)} [{_g(lo)}, {_g(hi)}]"


def _p(p: float) -> str:
    return "-" if p is None or math.isnan(p) else (f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}")


def render_claims(df: pd.DataFrame, fmt: str, title: str) -> str:
    """The claims table as text, markdown, LaTeX or CSV (every column)."""
    from orchestrator.report.tables import render_grid

    if fmt == "csv":
        return df.to_csv(index=False, float_format="%.6g")
    ours = df["dataset"].notna().any()
    headers = ["Claim", "A − B [95% CI]", "t", "p", "seeds", "verdict"] if ours else ["Claim"]
    headers += ["paper A − B [95% CI]", "paper p", "in the paper"]
    lines: list[list[str] | str] = []
    several = df[["dataset", "model"]].drop_duplicates().shape[0] > 1
    current = None
    for _, r in df.iterrows():
        if ours and several and (r["dataset"], r["model"]) != current:
            current = (r["dataset"], r["model"])
            lines.append(f"{current[0]}, {current[1]}")
        cells = [r["text"]]
        if ours:
            cells += [_ci(r), _g(r["t"]), _p(r["p"]), f"{r['n_a']}/{r['n_b']}", r["verdict"] or "-"]
        paper = r["paper_verdict"]
        if paper:
            paper = f"{paper} ({r['paper_dataset']})"
        cells += [_ci(r, "paper_"), _p(r["paper_p"]), paper or "not in its tables"]
        lines.append(cells)
    return render_grid(headers, lines, fmt, title)


def write_claims(df: pd.DataFrame, store: str, name: str) -> list[str]:
    """``df`` as ``store/claims/<name>.parquet`` and ``.csv`` (a folder or a storage URI); their locations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainables import storage

    folder = storage.join(store, "claims")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    where = [storage.join(folder, f"{name}.parquet"), storage.join(folder, f"{name}.csv")]
    storage.write_bytes(where[0], buf.getvalue().to_pybytes())
    storage.write_bytes(where[1], df.to_csv(index=False).encode())
    return where


def log_claims(df: pd.DataFrame, tracking_uri: str, out: Path, spec: str, preset: str, claims_path: str) -> str:
    """The run ``claims <preset>`` in the spec's MLflow experiment (made, or re-attached by a later
    ``report --claims``: one per preset): the table (``claims.json``, MLflow's table artifact, replaced),
    ``claims.csv``, the claims file, one metric per claim (1 holds, 0 not, -1 not enough seeds) and the
    code's provenance tags; the run's id."""
    from orchestrator.report.mlflow_run import drop_artifacts
    from orchestrator.tracking.tracker import Tracker

    local = not tracking_uri.startswith(("http://", "https://"))
    tracker = Tracker(tracking_uri, spec, out / "mlartifacts" if local else None)
    client = tracker.client
    run_id = tracker.run(f"claims {preset}", {"wbsweep.kind": "claims", "wbsweep.preset": preset})
    try:
        drop_artifacts(tracker, run_id, ["claims.json"])  # log_table appends to an existing table
        client.log_table(run_id, data=df, artifact_file="claims.json")
        code = {HOLDS: 1.0, FAILS: 0.0, FEW_SEEDS: -1.0}
        metrics = {}
        for _, r in df.iterrows():
            if r["verdict"] in code:
                suffix = f".{r['dataset']}.{r['model']}" if df["dataset"].nunique() > 1 else ""
                metrics[f"claim.{r['claim']}{suffix}"] = code[r["verdict"]]
        tracker.log_metrics(run_id, metrics)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "claims.csv"
            csv.write_text(df.to_csv(index=False))
            client.log_artifact(run_id, str(csv))
            if claims_path:
                client.log_artifact(run_id, claims_path)
        tracker.finish(run_id)
    except Exception:
        tracker.finish(run_id, "FAILED")
        raise
    return run_id


def claims_report(out: Path, spec: str, preset: str | None, claims_path: str | Path, fmt: str = "table",
                  paper_table: int | None = None, store: str | None = None, paper_only: bool = False,
                  tracking_uri: str | None = None, log=None, current_of=None) -> str:
    """``wbsweep report SPEC --claims``: the claims of ``claims_path`` tested on the spec's results
    (``store/results``, the rows of the configs the spec resolves to now, as the report shows them:
    ``current_of``, see :func:`orchestrator.report.selection.select_rows`) and on the paper's numbers;
    written to ``store/claims/<spec>-<preset>.{parquet,csv}`` and, where there is an MLflow store,
    logged as a run. ``paper_only``: the paper's numbers alone (no results needed)."""
    from orchestrator.record.results import read_rows
    from orchestrator.report.selection import select_rows
    from orchestrator.report.tables import FORMATS, _analysis_rows
    from trainables import storage

    if fmt not in FORMATS:
        raise WbsweepError(f"unknown report format '{fmt}': use {', '.join(FORMATS)}.")
    claims = load_claims(claims_path)
    store = store or str(out)
    if paper_only:
        if paper_table is None:
            raise WbsweepError(f"spec '{spec}' shows none of the paper's tables (paper_table), so there are no paper "
                               "numbers to test the claims on.")
        df = evaluate(claims, None, None, paper_table)
        df.insert(0, "preset", "paper-numbers")
        df.insert(0, "spec", spec)
        title = f"{spec} — claims on the paper's own numbers (Table {paper_table}; Welch, 95% CI)"
        return render_claims(df.drop(columns=["spec", "preset"]), fmt, title)
    results = storage.join(store, "results")
    if not storage.exists(results):
        raise WbsweepError(f"{results} does not exist; run `wbsweep run {spec} --out {out}` first "
                           "(or --paper for the paper's own numbers).")
    chosen = select_rows(read_rows(results), spec, preset, current_of)
    rows, preset = chosen.rows, chosen.preset
    analyses = None
    if any(c.analysis for c in claims.claims):
        analyses = _analysis_rows(store, rows, spec)
    df = evaluate(claims, rows, analyses, paper_table)
    if df.empty:
        raise WbsweepError(f"no claim of {claims.path} is about the datasets and models of spec '{spec}' "
                           f"preset '{preset}'.")
    unmatched = df[(df["n_a"] == 0) | (df["n_b"] == 0)]
    df.insert(0, "preset", preset)
    df.insert(0, "spec", spec)
    where = write_claims(df, store, f"{spec}-{preset}")
    text = render_claims(df.drop(columns=["spec", "preset"]), fmt,
                         f"{spec} — preset {preset}: claims (A > B), Welch's t-test, 95% CI, ≥{claims.min_seeds} seeds")
    if fmt == "csv":
        return text
    text += "".join(f"NOTE {line}\n" for line in chosen.lines)
    for _, r in unmatched.iterrows():
        text += (f"note: '{r['claim']}' has no rows for {r['group_a'] if r['n_a'] == 0 else r['group_b']} "
                 f"({r['dataset']}, {r['model']}); is that method in the spec?\n")
    text += f"claims written to {where[0]} and {where[1]}\n"
    if tracking_uri:
        try:
            run_id = log_claims(df, tracking_uri, out, spec, preset, claims.path)
            text += f"claims logged to MLflow ({tracking_uri}), run {run_id}\n"
            from orchestrator.report.mlflow_run import attach_claims

            attach_claims(tracking_uri, out, spec, preset, df)  # and to the spec-level run of the report
        except WbsweepError as exc:
            text += f"claims not logged to MLflow: {exc}\n"
    return text
