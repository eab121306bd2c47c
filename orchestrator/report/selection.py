"""Which rows a report shows: those of the configs the spec resolves to now, by config hash.

The table (``run``'s and ``report``'s) and the claims show, per method, the rows of the config a
sweep of the spec as it is now would train (:mod:`orchestrator.record.current`), whatever was
written when: after an edit is reverted, the reverted config's rows, even though they are the
oldest; never rows of another config because they were written later (a clock step, rows copied
from another machine). A method with no rows for its current config is said in a line, never
replaced by another config's rows. ``report --all-configs`` lists every config a folder holds.

Where the spec cannot be read any more (a spec file since deleted, a preset since removed), there
is no "now": of several configs of a method the latest written is shown, and a line says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from orchestrator.record.current import CurrentConfigs
from trainables.errors import WbsweepError
from trainables.methods import METHODS

#: ``current_of(preset, rows)``: the configs the spec's preset resolves to now
#: (orchestrator.record.current.current_configs), or why the spec cannot tell (it cannot be read).
CurrentOf = Callable[[str, pd.DataFrame], "CurrentConfigs | str"]


@dataclass
class Selection:
    rows: pd.DataFrame  # the rows shown
    preset: str
    lines: list[str] = field(default_factory=list)  # what the reader must know about the rows shown
    current: CurrentConfigs | None = None


def spec_rows(df: pd.DataFrame, spec: str, preset: str | None) -> tuple[pd.DataFrame, str]:
    """The rows of ``spec`` and ``preset`` (None: the preset written last), and the preset."""
    df = df[df["spec"] == spec]
    if df.empty:
        raise WbsweepError(f"no results for spec '{spec}' yet; run `wbsweep run {spec}` first (or check --out).")
    if preset is None:
        preset = df.sort_values("created_at")["preset"].iloc[-1]
    presets = sorted(set(df["preset"]))  # of the spec's rows, before keeping one preset's
    df = df[df["preset"] == preset]
    if df.empty:
        raise WbsweepError(f"no results for spec '{spec}' preset '{preset}'; presets with results: "
                           f"{', '.join(presets)} (report one with --preset, or run `wbsweep run {spec} "
                           f"--preset {preset}`).")
    return df, preset


def select_rows(df: pd.DataFrame, spec: str, preset: str | None, current_of: CurrentOf | None = None) -> Selection:
    """The rows of ``spec`` and ``preset`` a report shows (see the module docstring).
    ``current_of(preset, rows)`` gives the spec's current configs, or None where the spec cannot be read."""
    df, preset = spec_rows(df, spec, preset)
    current = current_of(preset, df) if current_of is not None else "no spec was given"
    if isinstance(current, str):
        return _latest(df, preset, current)
    rows = current.select(df)
    lines = current.notes + current.missing(df)
    if rows.empty:
        said = "".join(f" ({note})" for note in current.notes)
        raise WbsweepError(f"no rows of {spec}/{preset} for the configs the spec resolves to now{said}; this folder "
                           f"holds {df['config_hash'].nunique()} other config(s) of it (an edited spec, other data, "
                           f"or rows of an earlier version): list them with `wbsweep report {spec} --preset {preset} "
                           f"--all-configs`, or train the current ones with `wbsweep run {spec} --preset {preset}`.")
    order = current.order()
    rows = rows.assign(_v=[order.get(k, len(order)) for k in zip(rows["dataset"], rows["model"], strict=True)])
    rows = rows.sort_values(["_v", "created_at"], kind="stable").drop(columns="_v")
    return Selection(rows, preset, lines, current)


def _latest(df: pd.DataFrame, preset: str, why: str) -> Selection:
    """Without a spec (``why``: why not): per method (and dataset and model), the config written
    last, said where there were several."""
    keys = ["dataset", "model", "method"]
    latest = df.sort_values("created_at").groupby(keys)["config_hash"].last().rename("_latest")
    counts = df.groupby(keys)["config_hash"].nunique()
    merged = df.merge(latest, left_on=keys, right_index=True)
    rows = merged[merged["config_hash"] == merged["_latest"]].drop(columns="_latest")
    lines = [f"{label(method)} ({dataset}, {model}): {n} configs in this folder and the spec cannot tell which is "
             f"current ({why}); the one written last ({latest[(dataset, model, method)]}) is shown (--all-configs "
             "lists them)." for (dataset, model, method), n in counts.items() if n > 1]
    return Selection(rows.sort_values("created_at", kind="stable"), preset, lines)


def label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method
