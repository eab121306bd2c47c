"""Rebuild a paper table (mean ± std over seeds) from the Parquet results alone.

Where the experiment ran on the paper's dataset, the paper's published mean ± std stand beside
ours (``orchestrator/reference/*.csv``, transcribed from the paper). The paper's "ResNet32" rows
were produced by the authors' CIFAR ResNet34 (README); we say so under the table.
"""

from __future__ import annotations

import io
import math
from importlib import resources
from pathlib import Path

import pandas as pd

from orchestrator.results import read_rows
from trainables.errors import WbsweepError
from trainables.methods import METHODS

METRICS = ["fdr_train", "fdr_test", "acc_many", "acc_medium", "acc_few", "acc_avg"]
HEADERS = ["FDR train", "FDR test", "Many", "Medium", "Few", "Average"]
LA_ORDER = {"none": 0, "add": 1, "mult": 2}
LA_LABEL = {"none": "-", "add": "add (τ)", "mult": "mult (γ)"}
PAPER_MODEL = {"resnet32": "resnet", "resnet34": "resnet", "resnext50": "resnext50"}


def paper_reference() -> pd.DataFrame:
    path = resources.files("orchestrator") / "reference" / "paper_accuracy_tables.csv"
    return pd.read_csv(io.StringIO(path.read_text()))


def select_rows(df: pd.DataFrame, spec: str, preset: str | None) -> tuple[pd.DataFrame, str]:
    """Rows of one spec and preset; of several configs of one method, the most recent one."""
    df = df[df["spec"] == spec]
    if df.empty:
        raise WbsweepError(f"no results for spec '{spec}' yet; run `wbsweep run {spec}` first (or check --out).")
    if preset is None:
        preset = df.sort_values("created_at")["preset"].iloc[-1]
    df = df[df["preset"] == preset]
    if df.empty:
        raise WbsweepError(f"no results for spec '{spec}' preset '{preset}'; presets with results: "
                           f"{', '.join(sorted(set(df['preset'])))}.")
    latest = df.sort_values("created_at").groupby("method")["config_hash"].last()
    return df[df["config_hash"] == df["method"].map(latest)], preset


def summarize(df: pd.DataFrame, method_order: list[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds per (dataset, model, method, la), in the paper's row order."""
    g = df.groupby(["dataset", "model", "method", "la"], sort=False)
    out = g[METRICS].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["seeds"] = g["seed"].nunique()
    out["tau"] = g["tau"].mean()
    out["gamma"] = g["gamma"].mean()
    out = out.reset_index()
    order = {m: i for i, m in enumerate(method_order or list(METHODS))}
    out["_m"] = out["method"].map(lambda m: order.get(m, len(order)))
    out["_l"] = out["la"].map(LA_ORDER)
    return out.sort_values(["_m", "_l"]).drop(columns=["_m", "_l"]).reset_index(drop=True)


def attach_paper(summary: pd.DataFrame, table: int | None) -> pd.DataFrame:
    """Add paper_<metric> and paper_<metric>_std where the paper has the same (dataset, method, la)."""
    if table is None:
        return summary
    ref = paper_reference()
    ref = ref[ref["table"] == table]
    ref = ref.rename(columns={c: f"paper_{c}" for c in ref.columns if c not in ("dataset", "method", "la")})
    summary = summary.copy()
    summary["_pm"] = summary["model"].map(lambda m: PAPER_MODEL.get(m, m))
    merged = summary.merge(ref, how="left", left_on=["dataset", "_pm", "method", "la"],
                           right_on=["dataset", "paper_model", "method", "la"])
    return merged.drop(columns=["_pm", "paper_model", "paper_table"])


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if abs(v) >= 1000 else f"{v:.1f}"


def _pm(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return _num(mean) if std is None or (isinstance(std, float) and math.isnan(std)) else f"{_num(mean)} ± {_num(std)}"


def render(summary: pd.DataFrame, fmt: str, title: str) -> str:
    has_paper = "paper_acc_avg" in summary.columns and summary["paper_acc_avg"].notna().any()
    if fmt == "csv":
        return summary.to_csv(index=False, float_format="%.6g")
    headers = ["Method", "LA", *HEADERS, "seeds"]
    lines = []
    for _, r in summary.iterrows():
        label = METHODS[r["method"]].label if r["method"] in METHODS else r["method"]
        la = LA_LABEL[r["la"]]
        if r["la"] == "add" and not math.isnan(r["tau"]):
            la = f"add τ={r['tau']:.2f}"
        if r["la"] == "mult" and not math.isnan(r["gamma"]):
            la = f"mult γ={r['gamma']:.2f}"
        cells = [label, la, *(_pm(r[f"{m}_mean"], r[f"{m}_std"]) for m in METRICS), str(r["seeds"])]
        lines.append(cells)
        if has_paper and not math.isnan(r.get("paper_acc_avg", math.nan)):
            paper = ["", "  paper", *(_pm(r.get(f"paper_{m}"), r.get(f"paper_{m}_std")) for m in METRICS), ""]
            lines.append(paper)
    if fmt == "markdown":
        md = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(c for c in cells) + " |" for cells in lines]
        return "\n".join(md) + "\n"
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(headers)]
    fmt_row = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    text = [title, fmt_row.format(*headers), fmt_row.format(*("-" * w for w in widths))]
    text += [fmt_row.format(*cells) for cells in lines]
    return "\n".join(text) + "\n"


def report(out: Path, spec: str, preset: str | None = None, fmt: str = "table",
           table: int | None = None, method_order: list[str] | None = None, title: str | None = None) -> str:
    """The text of the report for ``spec`` from ``out/results``."""
    if fmt not in ("table", "markdown", "csv"):
        raise WbsweepError(f"unknown report format '{fmt}': use table, markdown or csv.")
    if not (out / "results").is_dir():
        raise WbsweepError(f"{out / 'results'} does not exist; run `wbsweep run {spec} --out {out}` first.")
    rows, preset = select_rows(read_rows(out / "results"), spec, preset)
    summary = attach_paper(summarize(rows, method_order), table)
    head = title or spec
    datasets = ", ".join(sorted(set(rows["dataset"])))
    models = ", ".join(sorted(set(rows["model"])))
    text = render(summary, fmt, f"{head} — preset {preset}: {datasets}, {models}; accuracy in %, mean ± std over seeds")
    if fmt != "csv" and "paper_acc_avg" in summary.columns and summary["paper_acc_avg"].notna().any():
        text += ("paper rows: Hasegawa & Sato (2023); their 'ResNet32' is the authors' CIFAR ResNet34 "
                 "(README: choices where the paper and the code differ), which the paper presets train.\n")
    return text
