"""Experiment specs: declarative YAML files that say what a table of the paper (or a user's new
experiment) trains, which hyperparameters Optuna searches, and how many seeds to repeat.

A spec has ``methods`` (each with its LA variants) and ``presets`` (``paper``, ``tuned``, ``cpu``,
``smoke``...). A preset may ``extends`` another and override any part of it; this keeps the CPU and
smoke presets the same *shape* as the paper's, only smaller. See ``search_spaces/table4.yaml``.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec.yaml_loader import describe
from orchestrator.spec.yaml_loader import load as load_yaml
from trainables.config import DEFAULTS, LA_KINDS, resolve_config
from trainables.errors import WbsweepError, unknown_name
from trainables.methods import Method, get_method
from trainables.models import check_model_name

SEARCH_KINDS = ("loguniform", "uniform", "choice", "grid")
PRESET_KEYS = {"extends", "description", "train", "hyper", "search", "trials", "seeds", "resources", "variants",
               "search_scheduler"}
VARIANT_KEYS = {"name", "train", "hyper", "search", "trials", "seeds", "search_scheduler"}
#: How ``wbsweep report`` lays a spec out: Table 4's accuracy table, Table 2's FDR per dataset,
#: Table 3's FDR before/after a random layer, or the figures of the analyses (trainables/analysis.py).
LAYOUTS = ("accuracy", "fdr", "fdr_random_layer", "figure")
RESOURCE_KEYS = {"cpus_per_trial", "gpus_per_trial", "max_concurrent", "max_failures", "fuse"}
SPEC_KEYS = ("name", "title", "layout", "paper_table", "paper_figure", "default_preset", "methods", "presets")
#: Spec, preset and variant names become parts of file names (status files, figures).
TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


@dataclass
class MethodEntry:
    method: Method
    la: list[str]


@dataclass
class Experiment:
    """A spec with one preset resolved: everything the orchestrator needs to plan the sweep."""

    name: str
    title: str
    preset: str
    paper_table: int | None
    methods: list[MethodEntry]
    train: dict[str, Any]  # training-config overrides shared by every method
    hyper: dict[str, float]  # fixed lambda, zeta, ... (the paper's values)
    search: dict[str, dict[str, Any]]  # knob -> distribution, searched on validation by Optuna
    trials: int
    seeds: list[int]
    resources: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    layout: str = "accuracy"  # one of LAYOUTS
    paper_figure: int | None = None
    variant: str | None = None  # the preset's variant (dataset/model) this experiment is, if it has variants
    search_scheduler: dict[str, Any] | None = None  # early stopping of tune trials (orchestrator.spec.early_stopping)

    def searched_for(self, method: Method) -> dict[str, dict[str, Any]]:
        """The part of the search space that applies to ``method`` (its knobs only)."""
        return {k: v for k, v in self.search.items() if k in method.searched}


@dataclass
class Stage:
    """One stage of an experiment: ``tune`` (Optuna searches the method's knobs on validation) or
    ``repeat`` (the chosen config over every seed, evaluated on test)."""

    kind: str  # "tune" | "repeat"
    entry: MethodEntry
    trials: int  # planned trials (before skipping finished work)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.entry.method.name}"


def stages(exp: Experiment) -> list[Stage]:
    """The stages of ``exp``: per method a tune stage (when it searches anything) and a repeat."""
    out: list[Stage] = []
    for entry in exp.methods:
        if exp.searched_for(entry.method) and exp.trials > 0:
            out.append(Stage("tune", entry, exp.trials))
        out.append(Stage("repeat", entry, len(exp.seeds)))
    return out


def check_dataset_name(name: str) -> None:
    from trainables.data import dataset_names

    if name not in dataset_names():
        raise unknown_name("dataset", name, dataset_names())


def spec_dir() -> Path:
    return Path(str(resources.files("search_spaces")))


def spec_names() -> list[str]:
    """Built-in spec names in natural order (table2 before table10)."""
    key = lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]  # noqa: E731
    return sorted((p.stem for p in spec_dir().glob("*.yaml")), key=key)


def find_spec(name_or_path: str) -> Path:
    """A spec by name (``table4``) from the package, or by path (``my/spec.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise WbsweepError(f"spec file {path} does not exist (or is not a file).")
        return path
    builtin = spec_dir() / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    raise unknown_name("spec", name_or_path, spec_names(), " (or a .yaml path)")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise WbsweepError(f"malformed spec {describe(exc, path)}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WbsweepError(f"cannot read spec {path}: {exc}.") from None
    if not isinstance(doc, dict):
        raise WbsweepError(f"spec {path} must be a YAML mapping with 'methods' and 'presets'.")
    return doc


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _resolve_preset(presets: dict[str, Any], name: str, where: str, chain: tuple[str, ...] = ()) -> dict:
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise WbsweepError(f"{where} has no preset '{name}'.{hint} Presets: {', '.join(presets)}.")
    if name in chain:
        raise WbsweepError(f"{where}: presets extend each other in a loop: {' -> '.join((*chain, name))}.")
    p = presets[name]
    if not isinstance(p, dict):
        raise WbsweepError(f"{where}: preset '{name}' must be a mapping.")
    _check_token("preset", str(name), where)
    unknown = set(p) - PRESET_KEYS
    if unknown:
        raise WbsweepError(f"{where}: preset '{name}' has unknown key(s) {', '.join(sorted(unknown))}; "
                           f"allowed: {', '.join(sorted(PRESET_KEYS))}.")
    if "extends" in p:
        if not isinstance(p["extends"], str):
            raise WbsweepError(f"{where}: preset '{name}': extends takes one preset name, got {p['extends']!r}; "
                               "to build on several, let each extend the next.")
        return _merge(_resolve_preset(presets, p["extends"], where, (*chain, name)), p)
    return copy.deepcopy(p)


def _check_token(kind: str, value: Any, where: str) -> None:
    if not isinstance(value, str) or not TOKEN.fullmatch(value):
        raise WbsweepError(f"{where}: {kind} name {value!r} must be one word of letters, digits and _ . + - "
                           "(it becomes part of file names), e.g. 'my_table4'.")


def _check_distribution(knob: str, dist: Any, where: str, train: dict[str, Any]) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SEARCH_KINDS:
        raise WbsweepError(f"{where}: search.{knob} must be one of {{loguniform: [low, high]}}, "
                           "{uniform: [low, high]}, {grid: [low, high, step]}, {choice: [a, b, ...]}.")
    kind, args = next(iter(dist.items()))
    if not isinstance(args, list) or not args:
        raise WbsweepError(f"{where}: search.{knob}.{kind} needs a list.")
    if kind in ("loguniform", "uniform", "grid"):
        n = 3 if kind == "grid" else 2
        if len(args) != n or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise WbsweepError(f"{where}: search.{knob}.{kind} needs {n} numbers, got {args!r}.")
        if args[0] >= args[1] or (kind == "loguniform" and args[0] <= 0):
            raise WbsweepError(f"{where}: search.{knob}.{kind} needs 0 < low < high (low > 0 for log), got {args!r}.")
    for value in args if kind == "choice" else args[:2]:  # each value must be one the option takes
        try:
            resolve_config({**train, knob: value})
        except WbsweepError as exc:
            raise WbsweepError(f"{where}: search.{knob}.{kind} value {value!r} does not fit: {exc}") from None


def load_experiment(name_or_path: str, preset: str | None = None, variant: str | None = None) -> Experiment:
    """Load a spec and resolve one preset (the spec's ``default_preset`` when None), validating
    every name and number so that mistakes are reported before any cluster time is spent. A preset
    with ``variants`` gives the named variant (default: the first); see :func:`load_experiments`."""
    exps = load_experiments(name_or_path, preset)
    if variant is None:
        return exps[0]
    for exp in exps:
        if exp.variant == variant:
            return exp
    raise WbsweepError(f"{exps[0].source}: preset '{exps[0].preset}' has no variant '{variant}'; variants: "
                       f"{', '.join(str(e.variant) for e in exps)}.")


def load_experiments(name_or_path: str, preset: str | None = None) -> list[Experiment]:
    """Every experiment of one preset of a spec: one, or one per entry of the preset's
    ``variants`` (a list of {name, train, hyper, search, trials, seeds} merged over the preset, so
    that one spec covers several datasets or models, e.g. Table 2's three datasets). The variants
    share the spec's methods and name; their results are told apart by dataset and model."""
    path = find_spec(name_or_path)
    doc = read_yaml(path)
    where = str(path)
    for key in ("name", "methods", "presets"):
        if key not in doc:
            raise WbsweepError(f"spec {where} lacks the required key '{key}'.")
    for key in doc:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise WbsweepError(f"{where}: unknown key '{key}'.{hint} Spec keys: {', '.join(SPEC_KEYS)} "
                               "(training options go in a preset's 'train').")
    _check_token("spec", str(doc["name"]), where)
    presets = doc["presets"]
    if not isinstance(presets, dict) or not presets:
        raise WbsweepError(f"{where}: 'presets' must map preset names to settings.")
    preset = preset or doc.get("default_preset") or next(iter(presets))
    p = _resolve_preset(presets, preset, where)
    layout = doc.get("layout", "accuracy")
    if layout not in LAYOUTS:
        raise WbsweepError(f"{where}: layout '{layout}' is not one of {', '.join(LAYOUTS)}.")
    paper_table = doc.get("paper_table")
    if paper_table is not None:
        from orchestrator.spec.paper import paper_tables

        known = paper_tables()[layout]
        if not known:
            raise WbsweepError(f"{where}: paper_table {paper_table!r}: the '{layout}' layout shows no paper table; "
                               "leave paper_table out (paper_figure names the paper's figure).")
        if isinstance(paper_table, bool) or paper_table not in known:
            raise WbsweepError(f"{where}: paper_table {paper_table!r} is not a paper table the '{layout}' layout "
                               f"shows; use one of {', '.join(map(str, known))}, or leave paper_table out.")
    variants = p.pop("variants", None)
    if variants is not None:
        if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) for v in variants):
            raise WbsweepError(f"{where}: preset '{preset}': variants must be a list of mappings "
                               f"with keys among {', '.join(sorted(VARIANT_KEYS))}.")
        for i, v in enumerate(variants):
            if set(v) - VARIANT_KEYS:
                raise WbsweepError(f"{where}: preset '{preset}': variant {i + 1} has unknown key(s) "
                                   f"{', '.join(sorted(set(v) - VARIANT_KEYS))}; allowed: "
                                   f"{', '.join(sorted(VARIANT_KEYS))}.")
        labels = [str(v.get("name", i + 1)) for i, v in enumerate(variants)]
        for label in labels:
            _check_token(f"preset '{preset}': variant", label, where)
        if len(set(labels)) != len(labels):
            raise WbsweepError(f"{where}: preset '{preset}': variant names must differ, got {labels}.")

    if not isinstance(doc["methods"], list) or not doc["methods"]:
        raise WbsweepError(f"{where}: 'methods' must be a list of {{method: NAME, la: [none, add, mult]}}.")
    methods = []
    for entry in doc["methods"]:
        entry = {"method": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "method" not in entry:
            raise WbsweepError(f"{where}: each entry of 'methods' needs a 'method' name, got {entry!r}.")
        la = entry.get("la", ["none"])
        la = [la] if isinstance(la, str) else la
        if not isinstance(la, list) or not la or any(x not in LA_KINDS for x in la):
            raise WbsweepError(f"{where}: method {entry['method']}: la must be a list of {', '.join(LA_KINDS)}.")
        methods.append(MethodEntry(get_method(str(entry["method"])), la))
    names = [m.method.name for m in methods]
    for m in methods:
        if m.method.parent and m.method.parent not in names:
            raise WbsweepError(f"{where}: method {m.method.name} needs its first stage "
                               f"'{m.method.parent}' in the same spec.")
    common = dict(name=str(doc["name"]), title=str(doc.get("title", doc["name"])), paper_table=paper_table,
                  paper_figure=doc.get("paper_figure"), layout=layout, methods=methods)
    if variants is None:
        return [_experiment(p, preset, where, common, None)]
    return [_experiment(_merge(p, {k: x for k, x in v.items() if k != "name"}), preset, where, common, label)
            for v, label in zip(variants, labels, strict=True)]


def _experiment(p: dict[str, Any], preset: str, where: str, common: dict[str, Any], variant: str | None) -> Experiment:
    """Validate one resolved preset (or variant) into an :class:`Experiment`."""
    if variant is not None:
        preset_name, preset = preset, f"{preset}' variant '{variant}"  # error messages name the variant

    train = p.get("train") or {}
    if not isinstance(train, dict):
        raise WbsweepError(f"{where}: preset '{preset}': 'train' must be a mapping of training options.")
    try:
        resolve_config(train)  # validates names, choices and ranges now
        check_dataset_name(str(train.get("dataset", DEFAULTS["dataset"])))
        check_model_name(str(train.get("model", DEFAULTS["model"])))
    except WbsweepError as exc:
        raise WbsweepError(f"{where}: preset '{preset}': {exc}") from None
    hyper = p.get("hyper") or {}
    search = p.get("search") or {}
    for section, table in (("hyper", hyper), ("search", search)):
        if not isinstance(table, dict):
            raise WbsweepError(f"{where}: preset '{preset}': '{section}' must be a mapping.")
        for knob in table:
            if knob not in DEFAULTS:
                close = difflib.get_close_matches(str(knob), DEFAULTS, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise WbsweepError(f"{where}: preset '{preset}': {section}.{knob} is not a training option.{hint}")
    for knob, value in hyper.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise WbsweepError(f"{where}: preset '{preset}': hyper.{knob} must be a number >= 0, got {value!r}.")
    for knob, dist in search.items():
        _check_distribution(knob, dist, f"{where}: preset '{preset}'", train)
    trials = p.get("trials", 0)
    seeds = p.get("seeds", [0])
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise WbsweepError(f"{where}: preset '{preset}': trials must be a whole number >= 0, got {trials!r}.")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise WbsweepError(f"{where}: preset '{preset}': seeds must be a list of distinct whole numbers.")
    res = p.get("resources") or {}
    if not isinstance(res, dict) or set(res) - RESOURCE_KEYS:
        raise WbsweepError(f"{where}: preset '{preset}': resources may only set {', '.join(sorted(RESOURCE_KEYS))}.")
    from orchestrator.spec.early_stopping import parse as parse_scheduler

    scheduler = parse_scheduler(p.get("search_scheduler"), f"{where}: preset '{preset}'")
    if variant is not None:
        preset = preset_name
    return Experiment(preset=preset, train=train, hyper=hyper, search=search, trials=trials, seeds=seeds,
                      resources=res, source=where, variant=variant, search_scheduler=scheduler, **common)
