"""The training configs a spec resolves to, and their config hashes: pure functions, no Ray.

The stage graph (:mod:`orchestrator.sweep.graph`, :mod:`orchestrator.sweep.stages`) builds every
config it hands Ray Tune with these; the report and ``run --plan`` use the same functions
(:mod:`orchestrator.record.current`) to tell which config hashes the spec asks for now, so the
table shows, and the plan subtracts, exactly the models a sweep would train.

* A first-stage method: the spec's ``train`` + the method's knobs with the preset's fixed
  hyperparameters + its LA variants + what the sweep adds (``machine``: device, threads, where the
  data are, their fingerprint).
* A second-stage method (WB): its parent's chosen config, the parent's model hash as
  ``parent_hash``, its own knobs.
* A tuned method: its base config with the searched values its tune stage chose, recorded in
  ``DIR/stages/tune-<method>-<key>.json`` (:func:`tune_key`).

Only ``data_fingerprint`` of ``machine`` reaches a config hash: ``device``, ``threads`` and
``data_root`` are left out of it (:data:`trainables.config.NOT_HASHED`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.spec import early_stopping
from orchestrator.spec.experiment import Experiment, MethodEntry
from trainables.config import config_hash
from trainables.methods import method_config
from trainables.trial import training_config


def first_stage_config(exp: Experiment, entry: MethodEntry, machine: dict[str, Any]) -> dict[str, Any]:
    """The training config of a first-stage method before any search: the spec's train options + the
    method's knobs with the preset's fixed hyperparameters + its LA variants + what this sweep adds
    (``machine``: device, threads, data)."""
    cfg: dict[str, Any] = dict(exp.train)
    cfg.update(method_config(entry.method, exp.hyper))
    cfg["la"] = list(entry.la)
    cfg.update(machine)
    return cfg


def second_stage_config(exp: Experiment, entry: MethodEntry, parent: dict[str, Any], machine: dict[str, Any],
                        runs: str) -> dict[str, Any]:
    """The training config of a second-stage method (WB) before any search: its parent's chosen
    config ``parent``, the parent's model as ``parent_hash``, its own knobs and LA variants."""
    cfg = dict(parent)
    cfg["parent_hash"] = model_hash(cfg, 0, runs)
    cfg.update(method_config(entry.method, exp.hyper))
    cfg["la"] = list(entry.la)
    cfg.update(machine)
    return cfg


def trial_config(cfg: dict[str, Any], seed: int, runs: str) -> dict[str, Any]:
    """A training config as a trial receives it (``_runs``: where the models live)."""
    return {**cfg, "seed": seed, "_runs": runs}


def model_hash(cfg: dict[str, Any], seed: int, runs: str) -> str:
    """The config hash of the model ``cfg`` trains for ``seed`` (the same for every seed)."""
    return config_hash(training_config(trial_config(cfg, seed, runs)))


def is_tuned(exp: Experiment, entry: MethodEntry) -> bool:
    """Whether the method has a tune stage (:func:`orchestrator.spec.experiment.stages`)."""
    return bool(exp.searched_for(entry.method)) and exp.trials > 0


def tune_key(exp: Experiment, base: dict[str, Any], search: dict[str, Any], planned: int, seed: int,
             runs: str) -> str:
    """What a tune stage's search is about, as a hash (its study's name and its recorded choice's
    file name): the base config's science (its config hash: not the device, threads, paths or
    options added later at their defaults), the objective's LA variants, the space, the budget, the
    seed, the early stopping. A rerun on another machine, or by a newer version, finds the stage's
    choice again."""
    return config_hash({"base": model_hash(base, seed, runs), "la": list(base["la"]), "search": search,
                        "trials": planned, "seed": seed, **early_stopping.key(exp)})


def choice_record(out: Path, method: str, key: str) -> Path:
    """Where a tune stage records the searched values it chose."""
    return out / "stages" / f"tune-{method}-{key}.json"


def read_choice(record: Path, search: dict[str, Any]) -> dict[str, Any] | None:
    """The searched values recorded in ``record``, or None where there is no record. A torn or
    foreign record raises ValueError (or OSError, KeyError, TypeError, AttributeError)."""
    if not record.exists():
        return None
    rec = json.loads(record.read_text())
    searched = rec.get("searched") or {k: rec["config"][k] for k in search}
    if not isinstance(searched, dict) or set(searched) != set(search):
        raise ValueError("not this stage's knobs")
    return searched


def data_root(exp: Experiment, option: str | None) -> str | None:
    """Where the trials read the dataset: ``option`` (--data-root), else the spec's ``data_root``,
    else $WBSWEEP_DATA_ROOT, made absolute here (``~`` and relative paths mean what they mean for
    the command, not for a trial, which runs in a folder of its own); None: each node's default."""
    from trainables.readers import DATA_ROOT_ENV, default_data_root

    root = option or exp.train.get("data_root")
    if root:
        return str(Path(root).expanduser().resolve())
    return str(default_data_root()) if os.environ.get(DATA_ROOT_ENV, "").strip() else None
