"""``wbsweep report SPEC --all-configs``: every config a results folder holds for a spec and preset.

One row per method and config hash: its seeds, when its rows were written (UTC), its average
accuracy, whether it is the config the spec asks for now (:mod:`orchestrator.record.current`) and
what it sets otherwise than that config (``wd 0.5 (now 0.005)``). The table ``report`` prints shows
only the current configs (:mod:`orchestrator.report.selection`); this lists the others too.
"""

from __future__ import annotations

import pandas as pd

from orchestrator.record.current import differences
from orchestrator.report.selection import CurrentOf, label, spec_rows
from orchestrator.report.tables import render_grid
from trainables.methods import METHODS


def all_configs(df: pd.DataFrame, spec: str, preset: str | None, current_of: CurrentOf | None,
                fmt: str) -> str:
    """``report --all-configs``: one row per method and config hash the folder holds for the spec
    and preset, with its seeds, when its rows were written (UTC), whether it is the config the spec
    asks for now, and what it sets otherwise than that."""
    df, preset = spec_rows(df, spec, preset)
    found = current_of(preset, df) if current_of is not None else "no spec was given"
    current = None if isinstance(found, str) else found
    now = {(m.method, m.dataset, m.model): m for m in current.methods} if current else {}
    keys = current.keys() if current else set()
    out = []
    for (dataset, model, method, hash_), g in df.groupby(["dataset", "model", "method", "config_hash"], sort=False):
        mc = now.get((method, dataset, model))
        out.append({
            "dataset": dataset, "model": model, "method": method, "config_hash": hash_,
            "current": "yes" if (method, hash_) in keys else ("?" if current is None else ""),
            "seeds": ",".join(str(int(s)) for s in sorted(set(g["seed"]))),
            "first_written": g["created_at"].min(), "last_written": g["created_at"].max(),
            "acc_avg": g.loc[g["la"] == g["la"].iloc[0], "acc_avg"].mean(),
            "differs": "" if (method, hash_) in keys else differences(g["config"].iloc[0], mc.config if mc else None),
        })
    table = pd.DataFrame(out)
    order = {m: i for i, m in enumerate(METHODS)}
    table = table.sort_values(["dataset", "model", "method", "last_written"],
                              key=lambda s: s.map(order) if s.name == "method" else s).reset_index(drop=True)
    if fmt == "csv":
        return table.to_csv(index=False, float_format="%.6g")
    when = lambda t: t.strftime("%Y-%m-%d %H:%M")  # noqa: E731
    headers = ["Method", "Dataset", "Model", "Config hash", "Current", "Differs from the current config", "Seeds",
               "Written (UTC)", "Average"]
    lines: list[list[str] | str] = [
        [label(r.method), r.dataset, r.model, r.config_hash, r.current, r.differs or "-", r.seeds,
         when(r.last_written), f"{r.acc_avg:.1f}"] for r in table.itertuples()]
    text = render_grid(headers, lines, fmt, f"{spec} — preset {preset}: every config this folder holds "
                                             "(Average: accuracy in %, mean over seeds, first LA variant)", left=6)
    if current is None:
        text += f"NOTE the spec cannot tell which config is current ({found}): Current is '?'.\n"
    else:
        text += "".join(f"NOTE {line}\n" for line in current.notes + current.missing(df))
    return text
