"""Figures as a paper needs them, read back from the matplotlib Axes: classes at integer ticks, log
axes labelled with plain numbers, and the spread over seeds drawn around every mean."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from trainables.plots import _pyplot, format_plain, plot_heatmap, plot_layers, plot_per_class

PLAIN = re.compile(r"^-?[0-9][0-9,]*(\.[0-9]+)?$|^0\.[0-9]+$")


def labels(axis) -> list[str]:
    """Every non-empty tick label (major and minor) of a drawn axis, in matplotlib's text (U+2212 as '-')."""
    ticks = axis.get_majorticklabels() + axis.get_minorticklabels()
    return [t.get_text().replace("\u2212", "-") for t in ticks if t.get_text()]


def visible_ticks(ax, axis) -> np.ndarray:
    lo, hi = sorted(axis.get_view_interval())
    ticks = np.asarray(axis.get_majorticklocs())
    return ticks[(ticks >= lo) & (ticks <= hi)]


@pytest.fixture()
def plt():
    plt = _pyplot()
    yield plt
    plt.close("all")


def test_per_class_curves_have_integer_class_ticks_plain_log_labels_and_a_seed_band(plt):
    fig, ax = plt.subplots()
    counts = [60, 40, 25, 12, 8]  # 5 classes: matplotlib's own ticks would be 0, 0.5, 1, ...
    means = {"WD": np.linspace(5.0, 12.0, 5), "Naive": np.linspace(6.0, 9.0, 5)}  # less than a decade
    stds = {"WD": np.full(5, 0.5), "Naive": np.full(5, 0.3)}
    plot_per_class(ax, counts, means, "norm", "t", log=True, spread=stds)
    fig.canvas.draw()
    xt = visible_ticks(ax, ax.xaxis)
    assert len(xt) >= 3 and np.all(xt == np.round(xt)), xt
    assert all(PLAIN.match(t) for t in labels(ax.xaxis)), labels(ax.xaxis)
    ys = labels(ax.yaxis)
    assert ys and all(PLAIN.match(t) for t in ys), ys  # not '$\\mathdefault{6\\times10^{0}}$'
    assert {"6", "10"} <= set(ys)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # one mean ± std band per method
    top = bands[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(12.5)  # the band reaches mean + std


def test_layers_and_heatmap_ticks(plt):
    fig, (a1, a2) = plt.subplots(1, 2)
    plot_layers(a1, ["l0", "l1", "l2"], {"WD": [300.0, 900.0, 2500.0]}, "t", spread={"WD": [10.0, 20.0, 30.0]})
    plot_heatmap(a2, np.eye(7), "cos")
    fig.canvas.draw()
    assert all(PLAIN.match(t) for t in labels(a1.yaxis)), labels(a1.yaxis)
    assert "1,000" in labels(a1.yaxis)
    assert len([c for c in a1.collections if isinstance(c, PolyCollection)]) == 1
    for axis in (a2.xaxis, a2.yaxis):
        t = visible_ticks(a2, axis)
        assert len(t) >= 2 and np.all(t == np.round(t)), t


def test_plain_numbers():
    assert [format_plain(x) for x in (0.5, 9.0, 20.0, 2000.0, 1e6, 0.05)] == ["0.5", "9", "20", "2,000",
                                                                               "1,000,000", "0.05"]
