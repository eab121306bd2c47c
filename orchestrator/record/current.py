"""Which rows of a results folder are current: the config hashes a spec and preset resolve to now.

A folder keeps the rows of every config it ever trained (an edited hyperparameter, other data, an
earlier protocol), and the time a row was written says nothing about which config the spec asks
for: a reverted edit finds its models already trained, so the reverted config's rows are the
oldest; a clock step or rows copied from another machine reorder them at will. The report, the
claims and ``run --plan`` therefore ask the spec: per method, the config hash a sweep would train
(:mod:`orchestrator.spec.configs`, the functions the stage graph builds its configs with), from

* the spec and preset as they are now;
* the data the sweep would train on (their fingerprint, :func:`trainables.datacache.dataset_fingerprint`,
  read here without downloading anything);
* for a tuned method, the choice its tune stage recorded (``DIR/stages/tune-<method>-<key>.json``):
  a method whose search has chosen nothing yet has no current config, and no rows are shown for it.

No Ray is started and nothing is written. Only the data fingerprint of what a sweep adds to a
config is hashed (``device``, ``threads``, ``data_root`` are not: :data:`trainables.config.NOT_HASHED`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.spec import configs
from orchestrator.spec.experiment import Experiment, MethodEntry
from trainables.config import DEFAULTS, NOT_HASHED
from trainables.errors import WbsweepError
from trainables.methods import METHODS


@dataclass
class MethodConfig:
    """One method of one experiment (a preset, or one of its variants) as the spec resolves it now."""

    exp: Experiment
    entry: MethodEntry
    config: dict[str, Any] | None  # the repeat stage's config (without seed); None: see reason
    config_hash: str | None
    reason: str = ""  # why there is no current config
    tune_base: dict[str, Any] | None = None  # a tuned method's search base (None: not tuned, or not known yet)
    tune_key: str | None = None
    tune_record: Path | None = None

    @property
    def method(self) -> str:
        return self.entry.method.name

    @property
    def dataset(self) -> str:
        return str(self.exp.train.get("dataset", DEFAULTS["dataset"]))

    @property
    def model(self) -> str:
        return str(self.exp.train.get("model", DEFAULTS["model"]))

    def who(self, several: bool) -> str:
        label = METHODS[self.method].label if self.method in METHODS else self.method
        return f"{label} ({self.dataset}, {self.model})" if several else label


@dataclass
class CurrentConfigs:
    """Per method (and variant) of a spec and preset, its current config hash, or why it has none."""

    spec: str
    preset: str
    methods: list[MethodConfig]
    notes: list[str] = field(default_factory=list)  # how the current configs were found, where that is not plain

    def keys(self) -> set[tuple[str, str]]:
        """(method, config hash) of every current config."""
        return {(m.method, m.config_hash) for m in self.methods if m.config_hash}

    def select(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The rows (of this spec and preset) of the current configs."""
        keys = self.keys()
        mine = [(m, h) in keys for m, h in zip(rows["method"], rows["config_hash"], strict=True)]
        return rows[mine] if len(rows) else rows

    def order(self) -> dict[tuple[str, str], int]:
        """(dataset, model) -> its place among the spec's variants."""
        out: dict[tuple[str, str], int] = {}
        for m in self.methods:
            out.setdefault((m.dataset, m.model), len(out))
        return out

    def absent(self, rows: pd.DataFrame) -> list[MethodConfig]:
        """The methods without rows in ``rows`` for their current config."""
        have = set(zip(rows["method"], rows["config_hash"], strict=True))
        return [m for m in self.methods if (m.method, m.config_hash) not in have]

    def missing(self, rows: pd.DataFrame) -> list[str]:
        """One line per method without rows for its current config (``rows``: this spec and preset's)."""
        several = len(self.order()) > 1
        lines = []
        for m in self.absent(rows):
            held = rows.loc[rows["method"] == m.method, "config_hash"].nunique()
            others = (f"; `wbsweep report {self.spec} --preset {self.preset} --all-configs` lists the {held} other "
                      f"config(s) of it this folder holds" if held else "")
            if m.config_hash is None:
                lines.append(f"{m.who(several)}: no rows shown: {m.reason}{others}.")
            else:
                lines.append(f"{m.who(several)}: no rows yet for the config the spec asks for now (config hash "
                             f"{m.config_hash}); `wbsweep run {self.spec} --preset {self.preset}` trains it{others}.")
        return lines


def current_configs(exps: list[Experiment], out: Path, runs: str, data_root: str | None = None,
                    rows: pd.DataFrame | None = None) -> CurrentConfigs:
    """The current config of every method of ``exps`` (the variants of one preset). ``out``: the
    folder whose ``stages/`` holds the tune stages' choices; ``runs``: where the models live
    (``<storage>/runs``); ``data_root``: as ``run --data-root``. ``rows``: the folder's results,
    used only where the data cannot be read here (their fingerprint is then taken from the rows
    that match the spec, said in a note, or refused in one line where several data would)."""
    exp0 = exps[0]
    current = CurrentConfigs(exp0.name, exp0.preset, [])
    for exp in exps:
        _add(current, exp, out, runs, data_root, rows)
    return current


def _add(current: CurrentConfigs, exp: Experiment, out: Path, runs: str, data_root: str | None,
         rows: pd.DataFrame | None) -> None:
    """The methods of ``exp`` on the data a sweep would train on (see :func:`current_configs`)."""
    fingerprint, why = data_fingerprint(exp, data_root)
    if fingerprint is not None:
        current.methods += resolve(exp, out, runs, data_root, fingerprint)
        return
    found = _from_rows(exp, out, runs, data_root, rows)
    dataset = str(exp.train.get("dataset", DEFAULTS["dataset"]))
    if len(found) > 1:
        prints = ", ".join(sorted(found))
        raise WbsweepError(f"the {dataset} data cannot be read here ({why}) and this folder holds rows of "
                           f"{exp.name}/{exp.preset} on {len(found)} different data ({prints}); give "
                           "--data-root (the data the spec uses) to tell which rows are current.")
    if found:
        (fingerprint, methods), = found.items()
        current.methods += methods
        current.notes.append(f"the {dataset} data cannot be read here ({why}): the rows' data (fingerprint "
                             f"{fingerprint}) are taken for the spec's; --data-root checks that.")
        return
    reason = (f"the {dataset} data cannot be read here ({why}), so its config hash is unknown and no row of "
              "this folder matches the spec on the data it recorded; give --data-root")
    current.methods += [MethodConfig(exp, e, None, None, reason) for e in exp.methods]


def data_fingerprint(exp: Experiment, data_root: str | None) -> tuple[str | None, str]:
    """The fingerprint of the data a sweep of ``exp`` trains on, read here (never downloaded), or
    None and why not."""
    from trainables.datacache import dataset_fingerprint

    train = {**DEFAULTS, **exp.train}
    try:
        return dataset_fingerprint(train["dataset"], configs.data_root(exp, data_root), train["rho"],
                                   train["val_per_class"], train["split"], download=False), ""
    except WbsweepError as exc:
        return None, str(exc).rstrip(".")


def _from_rows(exp: Experiment, out: Path, runs: str, data_root: str | None,
               rows: pd.DataFrame | None) -> dict[str, list[MethodConfig]]:
    """Per data fingerprint of this spec and preset's rows: the methods' current configs on those
    data, where at least one of them has rows."""
    if rows is None or rows.empty:
        return {}
    mine = rows[(rows["spec"] == exp.name) & (rows["preset"] == exp.preset)
                & (rows["dataset"] == exp.train.get("dataset", DEFAULTS["dataset"]))]
    have = set(zip(mine["method"], mine["config_hash"], strict=True))
    found = {}
    for fingerprint in sorted(set(mine["data_fingerprint"].dropna())):
        methods = resolve(exp, out, runs, data_root, fingerprint)
        if any((m.method, m.config_hash) in have for m in methods):
            found[fingerprint] = methods
    return found


def resolve(exp: Experiment, out: Path, runs: str, data_root: str | None,
            fingerprint: str | None) -> list[MethodConfig]:
    """Every method of ``exp`` on the data ``fingerprint``, as the stage graph resolves it
    (orchestrator/sweep/graph.py ``base_config``, orchestrator/sweep/stages.py). ``fingerprint``
    None: the hashes an earlier version gave the configs, before the data were part of a hash."""
    # what a sweep adds to every config; device and threads are not hashed (any value gives the same hashes)
    machine = {"data_fingerprint": fingerprint, "device": "auto", "threads": 1,
               "data_root": configs.data_root(exp, data_root)}
    done: dict[str, MethodConfig] = {}
    by_name = {e.method.name: e for e in exp.methods}

    def of(entry: MethodEntry) -> MethodConfig:
        name = entry.method.name
        if name not in done:
            done[name] = _method(exp, entry, out, runs, machine, of(by_name[entry.method.parent])
                                 if entry.method.parent else None)
        return done[name]

    return [of(e) for e in exp.methods]


def _method(exp: Experiment, entry: MethodEntry, out: Path, runs: str, machine: dict[str, Any],
            parent: MethodConfig | None) -> MethodConfig:
    if parent is None:
        base = configs.first_stage_config(exp, entry, machine)
    elif parent.config is None:
        return MethodConfig(exp, entry, None, None, f"its first stage '{parent.method}' has no current config "
                                                    f"({parent.reason})")
    else:
        base = configs.second_stage_config(exp, entry, parent.config, machine, runs)
    if not configs.is_tuned(exp, entry):
        return MethodConfig(exp, entry, base, configs.model_hash(base, 0, runs))
    search = exp.searched_for(entry.method)
    key = configs.tune_key(exp, base, search, exp.trials, exp.seeds[0], runs)
    record = configs.choice_record(out, entry.method.name, key)
    tune = dict(tune_base=base, tune_key=key, tune_record=record)
    try:
        searched = configs.read_choice(record, search)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return MethodConfig(exp, entry, None, None, f"its tune stage's record {record} is unreadable ({exc}); "
                                                    "the next `wbsweep run` makes the choice again", **tune)
    if searched is None:
        return MethodConfig(exp, entry, None, None, f"its tune stage has chosen no config yet for the spec as it "
                                                    f"is now (no {record.relative_to(out)} in {out})", **tune)
    chosen = {**base, **searched}
    return MethodConfig(exp, entry, chosen, configs.model_hash(chosen, 0, runs), **tune)


def differences(config: str, current: dict[str, Any] | None) -> str:
    """What a row's config (its ``config`` column) sets otherwise than ``current`` (a current
    config), in the keys that make a config hash: ``wd 0.5 (now 0.005)``."""
    if current is None:
        return ""
    try:
        row = {**DEFAULTS, **json.loads(config)}
    except (ValueError, TypeError):
        return "?"
    now = {**DEFAULTS, **current}
    keys = [k for k in DEFAULTS if k not in NOT_HASHED and k != "parent_hash" and row.get(k) != now.get(k)]
    return ", ".join(f"{k} {_short(row.get(k))} (now {_short(now.get(k))})" for k in keys)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
