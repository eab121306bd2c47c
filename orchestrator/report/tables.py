"""Rebuild a paper table (mean ± std over seeds) or figure from the Parquet datasets alone.

Where the experiment ran on the paper's dataset, the paper's published numbers stand beside ours
(``orchestrator/spec/reference/*.csv``, transcribed from the paper). The paper's "ResNet32" rows were
produced by the authors' CIFAR ResNet34 (README); we say so under the table.

A spec's ``layout`` picks the report:

* ``accuracy`` (Tables 4, 6-10): FDR and Many/Medium/Few/Average accuracy per method and LA;
* ``fdr`` (Table 2): train/test FDR per method (rows) and dataset (columns);
* ``fdr_random_layer`` (Table 3): FDR before/after an untrained linear layer + ReLU per model and
  dataset (rows) and method (columns), from the analyses dataset (``DIR/analyses``);
* ``figure`` (Figures 1-6): the figures of the analyses, aggregated over seeds (mean heatmap per
  method, mean curves), written as PNGs to ``DIR/figures/`` with a text summary of their numbers.

Formats: ``table`` (aligned text), ``markdown``, ``csv`` (the summary numbers) and ``latex``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.record.results import fewer_classes, mixed_data, read_rows
from orchestrator.report.selection import CurrentOf, select_rows
from orchestrator.spec.paper import paper_reference
from trainables import storage
from trainables.errors import WbsweepError
from trainables.methods import METHODS
from trainables.posthoc import default_grid

METRICS = ["fdr_train", "fdr_test", "acc_many", "acc_medium", "acc_few", "acc_avg"]
HEADERS = ["FDR train", "FDR test", "Many", "Medium", "Few", "Average"]
LA_ORDER = {"none": 0, "add": 1, "mult": 2}
LA_LABEL = {"none": "-", "add": "add (τ)", "mult": "mult (γ)"}
PAPER_MODEL = {"resnet32": "resnet", "resnet34": "resnet", "resnext50": "resnext50"}
FORMATS = ("table", "markdown", "csv", "latex")
#: Table 2's CSV names its rows by method and loss; ours are method presets.
TABLE2_METHODS = {"naive_ce": "naive", "naive_cb": "cb", "wd_ce": "wd", "wd_cb": "wd_cb", "wd_nobn": "wd_nobn",
                  "wd_fixbn": "wd_fixbn"}
PAPER_NOTE = "paper rows: Hasegawa & Sato (2023)"
RESNET_NOTE = ("; their 'ResNet32' is the authors' CIFAR ResNet34 (README: choices where the paper and the code "
               "differ), which the paper presets train")
LA_PARAM = {"add": ("tau", "τ", "tau_grid"), "mult": ("gamma", "γ", "gamma_grid")}


def notes(rows: pd.DataFrame, has_paper: bool, paper_models: set[str] | None = None) -> str:
    """The footnotes of a report, each about what its rows use:

    * where the paper's numbers are shown, their source, and the ResNet32/ResNet34 remark only when
      a shown paper row is a ResNet's (``paper_models``: the models of the rows with paper numbers);
    * the epochs kept (``select: best_val`` keeps the best validation epoch) where they are not the
      last: a model kept at epoch 2 of 20 is a different model from the converged one;
    * an LA parameter (τ, γ) chosen on the edge of its grid in most seeds: the best value may lie
      outside the grid (a preset can widen ``tau_grid`` / ``gamma_grid``);
    * first, a warning where rows of one dataset name were trained on different data."""
    lines = [f"WARNING {line}" for line in mixed_data(rows)] + [f"NOTE {line}" for line in fewer_classes(rows)]
    if has_paper:
        resnet = any(PAPER_MODEL.get(m) == "resnet" for m in (paper_models or set()))
        lines.append(PAPER_NOTE + (RESNET_NOTE if resnet else "") + ".")
    several = rows[["dataset", "model"]].drop_duplicates().shape[0] > 1
    keys = ["dataset", "model", "method"]

    def who(dataset: str, model: str, method: str) -> str:
        return f"{_label(method)} ({dataset}, {model})" if several else _label(method)

    for (dataset, model, method), g in rows.drop_duplicates(["config_hash", "seed"]).groupby(keys, sort=False):
        if (g["best_epoch"].notna() & (g["best_epoch"] < g["epochs"])).any():
            g = g.sort_values("seed")
            kept = ", ".join(str(int(e)) for e in g["best_epoch"])
            lines.append(f"{who(dataset, model, method)}: epochs kept {kept} of {int(g['epochs'].max())} (seeds "
                         f"{', '.join(str(int(x)) for x in g['seed'])}; the best validation epoch).")
    for la, (col, sym, option) in LA_PARAM.items():
        for (dataset, model, method), g in rows[rows["la"] == la].groupby(keys, sort=False):
            grid = json.loads(g["config"].iloc[0]).get(option) or default_grid(la)
            lo, hi = min(grid), max(grid)
            edge = g[col].dropna().map(lambda v, lo=lo, hi=hi: math.isclose(v, lo) or math.isclose(v, hi))
            if len(edge) and edge.sum() * 2 > len(edge):
                lines.append(f"{who(dataset, model, method)}, {la} LA: {sym} on the edge of its grid [{lo:g}, "
                             f"{hi:g}] in {int(edge.sum())}/{len(edge)} seeds; the best {sym} may lie outside "
                             f"(widen {option}).")
    return "".join(f"{line}\n" for line in lines)


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
    first = {k: i for i, k in enumerate(dict.fromkeys(zip(out["dataset"], out["model"], strict=True)))}
    out["_g"] = [first[k] for k in zip(out["dataset"], out["model"], strict=True)]
    return out.sort_values(["_g", "_m", "_l"]).drop(columns=["_g", "_m", "_l"]).reset_index(drop=True)


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


def _latex(cell: str) -> str:
    """A text cell as LaTeX: escaped, with ± τ γ × as math."""
    out = cell.replace("\\", "\\textbackslash{}")
    for a, b in (("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#")):
        out = out.replace(a, b)
    return (out.replace(" ± ", " $\\pm$ ").replace("τ", "$\\tau$").replace("γ", "$\\gamma$")
            .replace("×", "$\\times$"))


def render_grid(headers: list[str], lines: list[list[str] | str], fmt: str, title: str, left: int = 1) -> str:
    """Rows of cells as aligned text, markdown or a LaTeX tabular; a string in ``lines`` is a
    group heading (dataset, model) spanning the row. The first ``left`` columns are left-aligned."""
    cells = [ln for ln in lines if not isinstance(ln, str)]
    if fmt == "markdown":
        md = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for ln in lines:
            if isinstance(ln, str):
                md.append(f"| **{ln}** |" + " |" * (len(headers) - 1))
            else:
                md.append("| " + " | ".join(ln) + " |")
        return "\n".join(md) + "\n"
    if fmt == "latex":
        spec = "l" * left + "r" * (len(headers) - left)
        tex = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_latex(title)}}}", "\\small",
               f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(_latex(h) for h in headers) + " \\\\",
               "\\midrule"]
        for ln in lines:
            if isinstance(ln, str):
                tex.append(f"\\multicolumn{{{len(headers)}}}{{l}}{{\\textbf{{{_latex(ln)}}}}} \\\\")
            else:
                row = [_latex(c) for c in ln]
                if ln and ln[min(1, len(ln) - 1)].strip() == "paper" or (ln and ln[0].strip() == "paper"):
                    row = [f"\\textit{{{c}}}" if c else c for c in row]
                tex.append(" & ".join(row) + " \\\\")
        tex += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(tex) + "\n"
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt_row = "  ".join(f"{{:<{w}}}" if i < left else f"{{:>{w}}}" for i, w in enumerate(widths))
    text = [title, fmt_row.format(*headers), fmt_row.format(*("-" * w for w in widths))]
    text += [f"[{ln}]" if isinstance(ln, str) else fmt_row.format(*ln) for ln in lines]
    return "\n".join(text) + "\n"


def _label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _groups(df: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(df["dataset"], df["model"], strict=True)))


def render(summary: pd.DataFrame, fmt: str, title: str, absent: list | None = None,
           method_order: list[str] | None = None) -> str:
    """The accuracy table; ``absent``: the methods (orchestrator.record.current.MethodConfig) with no
    rows for their current config, each a row of dashes where it belongs (the notes say why)."""
    has_paper = "paper_acc_avg" in summary.columns and summary["paper_acc_avg"].notna().any()
    if fmt == "csv":
        return summary.to_csv(index=False, float_format="%.6g")
    headers = ["Method", "LA", *HEADERS, "seeds"]
    lines: list[list[str] | str] = []
    if absent:
        rows = [{"dataset": m.dataset, "model": m.model, "method": m.method, "la": "none", "_absent": True}
                for m in absent]
        order = {m: i for i, m in enumerate(dict.fromkeys([*(method_order or []), *METHODS]))}
        summary = pd.concat([summary, pd.DataFrame(rows)], ignore_index=True)
        first = {k: i for i, k in enumerate(dict.fromkeys(zip(summary["dataset"], summary["model"], strict=True)))}
        summary = summary.assign(_g=[first[k] for k in zip(summary["dataset"], summary["model"], strict=True)],
                                 _m=summary["method"].map(order))
        summary = summary.sort_values(["_g", "_m"], kind="stable").drop(columns=["_g", "_m"])
    groups = _groups(summary)
    current = None
    for _, r in summary.iterrows():
        if len(groups) > 1 and (r["dataset"], r["model"]) != current:
            current = (r["dataset"], r["model"])
            lines.append(f"{current[0]}, {current[1]}")
        if r.get("_absent") is True:
            lines.append([_label(r["method"]), "-", *("-" for _ in METRICS), "0"])
            continue
        la = LA_LABEL[r["la"]]
        if r["la"] == "add" and not math.isnan(r["tau"]):
            la = f"add τ={r['tau']:.2f}"
        if r["la"] == "mult" and not math.isnan(r["gamma"]):
            la = f"mult γ={r['gamma']:.2f}"
        cells = [_label(r["method"]), la, *(_pm(r[f"{m}_mean"], r[f"{m}_std"]) for m in METRICS), str(int(r["seeds"]))]
        lines.append(cells)
        if has_paper and not math.isnan(r.get("paper_acc_avg", math.nan)):
            paper = ["", "  paper", *(_pm(r.get(f"paper_{m}"), r.get(f"paper_{m}_std")) for m in METRICS), ""]
            lines.append(paper)
    return render_grid(headers, lines, fmt, title, left=2)


# --- Table 2: FDR per method and dataset ---------------------------------------------------------


def fdr_table(rows: pd.DataFrame, fmt: str, title: str, method_order: list[str] | None) -> tuple[str, set[str]]:
    """Train/test FDR per method (rows) and dataset (column pairs), the paper's beside ours; also the
    models whose rows show the paper's numbers."""
    one = rows.sort_values("la", key=lambda s: s.map(LA_ORDER)).drop_duplicates(["config_hash", "seed"])
    g = one.groupby(["dataset", "model", "method"], sort=False)
    summary = g[["fdr_train", "fdr_test"]].agg(["mean", "std"])
    summary.columns = [f"{m}_{s}" for m, s in summary.columns]
    summary["seeds"] = g["seed"].nunique()
    summary = summary.reset_index()
    ref = paper_reference("paper_table2_fdr.csv")
    ref["method"] = ref["method"].map(TABLE2_METHODS)
    ref = ref.rename(columns={"fdr_train": "paper_fdr_train", "fdr_test": "paper_fdr_test"})
    summary["_pm"] = summary["model"].map(lambda m: PAPER_MODEL.get(m, m))
    summary = summary.merge(ref, how="left", on=["dataset", "method"])
    summary.loc[summary["_pm"] != "resnet", ["paper_fdr_train", "paper_fdr_test"]] = np.nan
    summary = summary.drop(columns="_pm")
    if fmt == "csv":
        return summary.to_csv(index=False, float_format="%.6g"), set()
    cols = _groups(summary)
    order = method_order or list(dict.fromkeys(summary["method"]))
    headers = ["Method"] + [f"{d} ({m}) {side}" for d, m in cols for side in ("train", "test")] + ["seeds"]
    lines: list[list[str] | str] = []
    has_paper = summary["paper_fdr_test"].notna().any()
    for method in order:
        sub = summary[summary["method"] == method]
        if sub.empty:
            continue
        ours, paper = [_label(method)], ["  paper"]
        for d, m in cols:
            r = sub[(sub["dataset"] == d) & (sub["model"] == m)]
            if r.empty:
                ours += ["-", "-"]
                paper += ["", ""]
                continue
            r = r.iloc[0]
            ours += [_pm(r["fdr_train_mean"], r["fdr_train_std"]), _pm(r["fdr_test_mean"], r["fdr_test_std"])]
            paper += [_num(r["paper_fdr_train"]), _num(r["paper_fdr_test"])]
        ours.append("/".join(str(int(x)) for x in sub["seeds"].unique()))
        lines.append(ours)
        if has_paper and any(c not in ("", "-") for c in paper[1:]):
            lines.append([*paper, ""])
    return render_grid(headers, lines, fmt, title), set(summary.loc[summary["paper_fdr_test"].notna(), "model"])


# --- Table 3: FDR before/after a random layer ------------------------------------------------------


def _analysis_rows(store: str, rows: pd.DataFrame, spec: str) -> pd.DataFrame:
    """The analyses rows of the models in ``rows`` (results of one spec and preset), with the
    results' method; a model analysed for several specs counts once."""
    from orchestrator.record.analyses import FOLDER, read_analysis_rows

    where = storage.join(store, FOLDER)
    a = read_analysis_rows(where)
    models = rows[["config_hash", "seed", "method", "dataset", "model"]].drop_duplicates(["config_hash", "seed"])
    a = a.drop(columns=["method", "dataset", "model"]).merge(models, on=["config_hash", "seed"])
    a = a.drop_duplicates(["config_hash", "seed", "analysis", "key", "i", "j"])
    if a.empty:
        raise WbsweepError(f"no analyses for spec '{spec}' in {where}; compute them from the checkpoints with "
                           f"`wbsweep analyze --spec {spec}`.")
    return a


def random_layer_table(a: pd.DataFrame, fmt: str, title: str, method_order: list[str] | None) -> tuple[str, set[str]]:
    """Table 3's layout; also the models whose rows show the paper's numbers."""
    a = a[(a["analysis"] == "fdr_random_layer") & a["key"].isin(["before_test", "after_test"])]
    g = a.groupby(["model", "dataset", "method", "key"], sort=False)["value"]
    summary = g.agg(["mean", "std", "count"]).reset_index()
    ref = paper_reference("paper_table3_fdr_random_layer.csv")
    if fmt == "csv":
        wide = summary.merge(ref, how="left", on=["model", "dataset", "method"])
        return wide.to_csv(index=False, float_format="%.6g"), set()
    methods = method_order or list(dict.fromkeys(summary["method"]))
    methods = [m for m in methods if m in set(summary["method"])]
    headers = ["Model", "Dataset"] + [f"{_label(m)} {side}" for m in methods for side in ("before", "after")]
    lines: list[list[str] | str] = []
    paper_models: set[str] = set()
    for model, dataset in dict.fromkeys(zip(summary["model"], summary["dataset"], strict=True)):
        ours, paper = [model, dataset], ["", "  paper"]
        found = False
        for m in methods:
            for side in ("before", "after"):
                r = summary[(summary["model"] == model) & (summary["dataset"] == dataset) & (summary["method"] == m)
                            & (summary["key"] == f"{side}_test")]
                ours.append(_pm(r["mean"].iloc[0], r["std"].iloc[0]) if len(r) else "-")
                p = ref[(ref["model"] == model) & (ref["dataset"] == dataset) & (ref["method"] == m)]
                paper.append(_num(float(p[f"fdr_{side}"].iloc[0])) if len(p) else "")
                found = found or bool(len(p))
        lines.append(ours)
        if found:
            paper_models.add(model)
            lines.append(paper)
    return render_grid(headers, lines, fmt, title, left=2), paper_models


# --- Figures 1-6 -------------------------------------------------------------------------------------


def _group_of(counts: np.ndarray, dataset: str) -> np.ndarray:
    from trainables.data import class_groups, dataset_info

    try:
        info = dataset_info(dataset)
        many, few = info["many_threshold"], info["few_threshold"]
    except WbsweepError:
        many, few = np.inf, -np.inf
    return np.asarray(class_groups(list(counts), many, few))


def _per_class(a: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per (method, class): mean and std over seeds of ``key``."""
    s = a[a["key"] == key].groupby(["method", "i"])["value"].agg(["mean", "std", "count"]).reset_index()
    return s


def figure_report(out: Path, a: pd.DataFrame, spec: str, preset: str, fmt: str, title: str,
                  method_order: list[str] | None) -> str:
    """Draw each analysis of ``a`` per (dataset, model), aggregated over seeds, into
    ``out/figures``; return their paths with a summary of the numbers behind them."""
    from trainables.plots import TITLES, _pyplot, plot_heatmap, plot_layers, plot_per_class

    plt = _pyplot()
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    order = {m: i for i, m in enumerate(method_order or [])}
    sections: list[tuple[str, list[str], list[list[str] | str], Path]] = []
    csv_parts = []
    drawn = [x for x in TITLES if x != "fdr_random_layer"]  # Table 3's numbers are a table, not a figure
    for analysis in [x for x in drawn if x in set(a["analysis"])]:
        sub_a = a[a["analysis"] == analysis]
        for dataset, model in _groups(sub_a):
            sub = sub_a[(sub_a["dataset"] == dataset) & (sub_a["model"] == model)]
            methods = sorted(dict.fromkeys(sub["method"]), key=lambda m: order.get(m, len(order)))
            path = figdir / f"{spec}-{preset}-{analysis}-{dataset}-{model}.png"
            head = f"{TITLES[analysis]}: {dataset}, {model}, mean over seeds"
            if analysis != "class_cosine":  # the heatmaps are means; their table gives the spread
                head += " (band: ± std)"
            agg = (sub.groupby(["method", "key", "i", "j", "label"], dropna=False)["value"]
                   .agg(["mean", "std", "count"]).reset_index())
            agg.insert(0, "model", model)
            agg.insert(0, "dataset", dataset)
            agg.insert(0, "analysis", analysis)
            csv_parts.append(agg)
            counts = _per_class(sub, "class_count")
            counts = counts[counts["method"] == methods[0]].sort_values("i")["mean"].to_numpy() \
                if not counts.empty else None
            if analysis == "class_cosine":
                fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods) + 0.8, 3.6), squeeze=False)
                headers = ["Method", "intra-class cos", "inter-class cos", "seeds"]
                lines: list[list[str] | str] = []
                for ax, m in zip(axes[0], methods, strict=True):
                    cos = sub[(sub["method"] == m) & (sub["key"] == "cos")]
                    per_seed = cos.groupby("seed")
                    intra = per_seed.apply(lambda d: np.nanmean(d.loc[d["i"] == d["j"], "value"]))
                    inter = per_seed.apply(lambda d: np.nanmean(d.loc[d["i"] != d["j"], "value"]))
                    c = int(cos["i"].max()) + 1
                    mat = np.full((c, c), np.nan)
                    mean = cos.groupby(["i", "j"])["value"].mean()
                    for (i, j), v in mean.items():
                        mat[int(i), int(j)] = v
                    im = plot_heatmap(ax, mat, _label(m))
                    lines.append([_label(m), _pm2(intra.mean(), intra.std()), _pm2(inter.mean(), inter.std()),
                                  str(cos["seed"].nunique())])
                fig.colorbar(im, ax=list(axes[0]), label="mean cosine similarity")
                fig.suptitle(head, fontsize=10)
            elif analysis == "relu_fdr":
                fig, ax = plt.subplots(figsize=(7, 4.5))
                layers = (sub[sub["key"] == "trained"].drop_duplicates("i").sort_values("i")["label"].tolist())
                series, spread, lines = {}, {}, []
                for m in methods:
                    v = sub[(sub["method"] == m) & (sub["key"] == "trained")].groupby("i")["value"]
                    series[_label(m)] = v.mean().sort_index().to_numpy()
                    spread[_label(m)] = v.std().sort_index().to_numpy()
                un = sub[(sub["method"] == methods[0]) & (sub["key"] == "untrained")].groupby("i")["value"]
                series["untrained"] = un.mean().sort_index().to_numpy()
                spread["untrained"] = un.std().sort_index().to_numpy()
                plot_layers(ax, layers, series, head, spread=spread)
                headers = ["Layer", *series]
                for k, layer in enumerate(layers):
                    lines.append([layer, *(_num(series[s][k]) if k < len(series[s]) else "-" for s in series)])
            else:
                key, ylabel = {"feature_norms": ("norms", "norm of the class-mean train feature"),
                               "forgetting": ("mean", "forgetting score (mean over learned images)"),
                               "weight_norms": ("ratio", "||w_k|| / ||w_largest class||")}[analysis]
                fig, ax = plt.subplots(figsize=(7, 4.5))
                series, spread = {}, {}
                headers = ["Method", "Many", "Medium", "Few", "all", "seeds"]
                if analysis == "forgetting":
                    headers.insert(5, "never learned")
                lines = []
                grp = _group_of(counts, dataset) if counts is not None else None
                for m in methods:
                    pc = _per_class(sub[sub["method"] == m], key).sort_values("i")
                    vals = pc["mean"].to_numpy()
                    series[_label(m)] = vals
                    spread[_label(m)] = pc["std"].to_numpy()
                    cells = [_label(m)]
                    for gname in ("many", "medium", "few"):
                        sel = grp == gname if grp is not None and len(grp) == len(vals) else np.zeros(len(vals), bool)
                        cells.append(_num(float(np.nanmean(vals[sel]))) if sel.any() else "-")
                    cells.append(_num(float(np.nanmean(vals))) if len(vals) else "-")
                    if analysis == "forgetting":
                        nl = _per_class(sub[sub["method"] == m], "never_learned")["mean"].to_numpy()
                        cells.append(f"{100 * float(np.nanmean(nl)):.1f}%" if len(nl) else "-")
                    cells.append(str(sub[sub["method"] == m]["seed"].nunique()))
                    lines.append(cells)
                plot_per_class(ax, counts if counts is not None else np.zeros(0), series, ylabel, head,
                               log=analysis == "feature_norms", spread=spread)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # whole files: another report may draw it too
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
            os.replace(tmp, path)
            plt.close(fig)
            sections.append((head, headers, lines, path))
    if fmt == "csv":
        return pd.concat(csv_parts).to_csv(index=False, float_format="%.6g") if csv_parts else ""
    text = []
    for head, headers, lines, path in sections:
        text.append(render_grid(headers, lines, fmt, f"{title} — {head}"))
        if fmt == "latex":
            text.append("\\begin{figure}[t]\\centering\n"
                        f"\\includegraphics[width=\\linewidth]{{{path.resolve()}}}\n"
                        f"\\caption{{{_latex(head)}}}\n\\end{{figure}}\n")
        else:
            text.append(f"figure: {path}\n")
    return "\n".join(text)


def _pm2(mean: float, std: float) -> str:
    """mean ± std with 3 decimals (cosines)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def report(out: Path, spec: str, preset: str | None = None, fmt: str = "table",
           table: int | None = None, method_order: list[str] | None = None, title: str | None = None,
           layout: str = "accuracy", analyses: list[str] | None = None, store: str | None = None,
           current_of: CurrentOf | None = None) -> str:
    """The text of the report for ``spec`` from ``store/results`` (and ``store/analyses``; the
    storage defaults to ``out``, where figures are drawn). ``analyses`` limits a figure report to
    the spec's own analyses (a model reused from another spec may hold more). ``current_of(preset,
    rows)``: the configs the spec resolves to now, whose rows are shown (orchestrator/report/selection.py);
    None: the spec is not at hand, the config written last per method is shown."""
    if fmt not in FORMATS:
        raise WbsweepError(f"unknown report format '{fmt}': use {', '.join(FORMATS)}.")
    store = store or str(out)
    results = storage.join(store, "results")
    if not storage.exists(results):
        raise WbsweepError(f"{results} does not exist; run `wbsweep run {spec} --out {out}` first.")
    chosen = select_rows(read_rows(results), spec, preset, current_of)
    rows, preset = chosen.rows, chosen.preset
    said = "".join(f"NOTE {line}\n" for line in chosen.lines) if fmt != "csv" else ""
    head = title or spec
    datasets = ", ".join(dict.fromkeys(rows["dataset"]))
    models = ", ".join(dict.fromkeys(rows["model"]))
    where = f"{head} — preset {preset}: {datasets}; {models}"
    if layout == "fdr":
        text, paper_models = fdr_table(rows, fmt, f"{where}; FDR mean ± std over seeds", method_order)
        return text + (said + notes(rows, bool(paper_models), paper_models) if fmt != "csv" else "")
    if layout == "fdr_random_layer":
        a = _analysis_rows(store, rows, spec)
        text, paper_models = random_layer_table(a, fmt, f"{where}; test FDR before/after, mean ± std over seeds",
                                                method_order)
        return text + (said + notes(rows, bool(paper_models), paper_models) if fmt != "csv" else "")
    if layout == "figure":
        a = _analysis_rows(store, rows, spec)
        if analyses:
            a = a[a["analysis"].isin(analyses)]
        return figure_report(out, a, spec, preset, fmt, where, method_order) + said
    summary = attach_paper(summarize(rows, method_order), table)
    absent = chosen.current.absent(rows) if chosen.current else []
    text = render(summary, fmt, f"{where}; accuracy in %, mean ± std over seeds", absent, method_order)
    if fmt != "csv":
        shown = summary[summary["paper_acc_avg"].notna()] if "paper_acc_avg" in summary.columns else summary[:0]
        text += said + notes(rows, not shown.empty, set(shown["model"]))
    return text
