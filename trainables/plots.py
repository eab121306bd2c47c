"""The figures of the analyses (trainables/analysis.py), drawn with matplotlib: one run's PNG
(:func:`plot_run`) and the pieces the report's figures over seeds and methods are made of
(orchestrator/report/tables.py): per-class curves, per-layer curves, class x class heatmaps, with classes
at integer ticks, log axes labelled with plain numbers and the spread over seeds as a band.

matplotlib is imported when a figure is drawn (:func:`_pyplot`), not with this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The title of each analysis's figure (a run's PNG, the report's figures).
TITLES = {
    "fdr_random_layer": "FDR before / after an untrained linear layer + ReLU",
    "class_cosine": "mean cosine similarity of train features per pair of classes",
    "relu_fdr": "ReLU-FDR of every layer's output",
    "feature_norms": "norm of the per-class mean train feature",
    "forgetting": "forgetting score per class",
    "weight_norms": "classifier weight norm ratio to the largest class",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_formatter() -> Any:
    """Tick labels of a log axis as plain numbers (``0.5``, ``9``, ``2,000``), not ``9×10^0``:
    matplotlib's ``LogFormatter`` (which labels some minor ticks, 2, 3, 5, ..., where the axis spans
    two decades or less, and all of them below half a decade) with its numbers printed by
    :func:`format_plain`."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):  # matplotlib's hook for the text of a label
            return format_plain(x)

    return PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))


def format_plain(x: float) -> str:
    """A tick value as a plain number: integers with thousands separators, others in ``%g``."""
    if x == 0:
        return "0"
    if abs(x) >= 1 and float(x).is_integer():
        return f"{x:,.0f}"
    return f"{x:g}"


def plain_log_axis(axis) -> None:
    """Plain labels (:func:`plain_log_formatter`) on a log-scaled ``ax.xaxis`` / ``ax.yaxis``, major and minor ticks."""
    axis.set_major_formatter(plain_log_formatter())
    axis.set_minor_formatter(plain_log_formatter())


def integer_axis(axis) -> None:
    """Ticks only at integers (class ranks, layer indices): never 2.5 classes."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_heatmap(ax, matrix: Any, title: str) -> Any:
    """Class x class heatmap of mean cosine similarity (classes in label order, largest first)."""
    m = np.asarray(matrix, dtype=np.float64)
    im = ax.imshow(m, vmin=-1.0, vmax=1.0, cmap="RdBu_r", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("class (0 = most train images)", fontsize=8)
    ax.set_ylabel("class (0 = most train images)", fontsize=8)
    integer_axis(ax.xaxis)
    integer_axis(ax.yaxis)
    return im


def _band(ax, x: np.ndarray, mean: np.ndarray, std: Any, log: bool, color: Any) -> None:
    """The seed spread: mean ± std as a shaded band (on a log axis a band that would reach 0 stops at the mean)."""
    if std is None:
        return
    sd = np.asarray(std, dtype=np.float64)
    if sd.shape != mean.shape or not np.isfinite(sd).any():
        return
    sd = np.nan_to_num(sd)
    lo, hi = mean - sd, mean + sd
    if log:
        lo = np.where(lo > 0, lo, mean)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)


def plot_per_class(ax, counts: Sequence[float], series: dict[str, Any], ylabel: str, title: str,
                   log: bool = False, spread: dict[str, Any] | None = None) -> None:
    """One line per method over the classes sorted by training count (largest first); ``spread``
    (the std over seeds per class, by series) is drawn as a band of mean ± std around each line."""
    order = np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable")
    for label, values in series.items():
        v = np.asarray(values, dtype=np.float64)
        o = order if len(order) == len(v) else np.arange(len(v))
        v = v[o]
        x = np.arange(len(v))
        (line,) = ax.plot(x, v, marker="o" if len(v) <= 20 else None, ms=3, label=label)
        sd = (spread or {}).get(label)
        _band(ax, x, v, np.asarray(sd, dtype=np.float64)[o] if sd is not None and len(sd) == len(v) else None, log,
              line.get_color())
    ax.set_xlabel("class rank by training count (0 = most images)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    integer_axis(ax.xaxis)
    if log:
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_layers(ax, layers: Sequence[str], series: dict[str, Any], title: str,
                spread: dict[str, Any] | None = None) -> None:
    """ReLU-FDR per layer (figure 2): one line per method, layers in execution order; ``spread``
    (std over seeds per layer, by series) as a band of mean ± std."""
    for label, values in series.items():
        v = np.asarray(values, dtype=np.float64)
        x = np.arange(len(v))
        (line,) = ax.plot(x, v, marker="o", ms=3, label=label)
        _band(ax, x, v, (spread or {}).get(label), True, line.get_color())
    ax.set_xticks(np.arange(len(layers)))
    ax.set_xticklabels([str(x).split(":")[-1].replace("BatchNorm", "BN") for x in layers], rotation=90, fontsize=6)
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("ReLU-FDR (test)")
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_run(result: dict[str, Any], name: str, path: Path) -> None:
    """The PNG of one analysis of one run (the report draws the figures over seeds and methods)."""
    plt = _pyplot()
    r = result["analyses"][name]
    counts = result.get("class_counts") or []
    title = f"{TITLES[name]}\n{result.get('dataset')}, {result.get('model')}, seed {result.get('seed')}"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if name == "class_cosine":
        im = plot_heatmap(ax, np.asarray(r["matrix"], dtype=np.float64), title)
        fig.colorbar(im, ax=ax, label="mean cosine similarity")
    elif name == "relu_fdr":
        plot_layers(ax, r["layers"], {"trained": r["trained"], "untrained": r["untrained"]}, title)
    elif name == "feature_norms":
        plot_per_class(ax, counts, {"||mean feature||": r["norms"]}, "norm of the class-mean train feature", title)
    elif name == "forgetting":
        plot_per_class(ax, counts, {"mean over learned images": r["mean"]}, "forgetting score", title)
        ax2 = ax.twinx()
        order = np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable")
        ax2.plot(np.asarray(r["never_learned"], dtype=np.float64)[order], color="grey", ls="--")
        ax2.set_ylabel("fraction never learned (dashed)")
    elif name == "weight_norms":
        plot_per_class(ax, counts, {"||w_k|| / ||w_0||": r["ratio"]}, "classifier norm ratio", title)
    elif name == "fdr_random_layer":
        keys = ["before_test", "after_test", "before_train", "after_train"]
        ax.bar(keys, [r.get(k) or 0.0 for k in keys])
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_ylabel("FDR")
        ax.set_xlabel("features (split)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
