"""What a sweep will cost before it runs: ``wbsweep run SPEC --plan``.

Per stage: the models it trains (finished ones subtracted), the epochs of each, and the estimated
device time; in total the device-hours (GPU-hours on a GPU) with and without early stopping of the
search trials, and, given a price per GPU-hour, the cost. Every figure is an estimate.

The time of one model is ``setup + epochs x epoch + final`` seconds (the split of
:func:`orchestrator.bench.speed.full_run`: setup and the first epoch, the steady epoch with its validation
pass, the final evaluation), plus Ray Tune's per-trial overhead (``TRIAL_OVERHEAD_S``, measured by
``wbsweep bench --overhead``: docs/performance.md). Where the figures come from:

* ``here`` (default) or ``cpu``: a short measurement on this machine: ``train()`` of the spec's
  model on the spec's dataset for a few epochs (on synthetic data of the real shape, and on a
  subset scaled up, where the dataset is not installed or an epoch would take long);
* a device name (``h100``, ``h200``, ``a100``, ...): the ``full_run_<model>`` figures that
  ``wbsweep bench --full-run N --json-out bench/results-<device>-....json`` recorded on such a GPU
  (bench/results-*.json), scaled by the training images per epoch (CIFAR-shaped data only). A
  model not recorded for that device is scaled from another device that recorded both it and one
  of this device's models (the plan says so);
* a path to such a JSON file.

Early stopping is counted at its nominal budget (:func:`orchestrator.spec.early_stopping.expected_epochs`,
Li et al. 2020): the spec's ``search_scheduler`` settings, else ASHA's defaults.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.spec import early_stopping as early_stop
from orchestrator.spec.experiment import stages
from trainables.errors import WbsweepError

#: Ray Tune's cost per trial (seconds) beyond the training itself: measured with `wbsweep bench
#: --overhead` on a 2-core machine (+1.29 s per trial, actors reused; docs/performance.md).
TRIAL_OVERHEAD_S = 1.3
#: A sweep's fixed cost on this kind of machine (seconds): Python and Ray start, the first trial
#: workers' imports, the final table. Measured: 20-30 s on the 2-core VM of docs/performance.md.
SWEEP_START_S = 25.0
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
#: Images per class of the original training sets the CIFAR/MNIST-shaped recorded figures scale by.
ORIGINAL_TRAIN = {"cifar10": (50_000, 10), "cifar100": (50_000, 100), "mnist": (60_000, 10),
                  "fashion-mnist": (60_000, 10)}


class NoEstimate(WbsweepError):
    """No device-time estimate for this experiment (the plan is printed without one)."""


@dataclass
class Speed:
    """Seconds of one model: ``setup_s`` once, ``epoch_s`` per epoch (with validation), ``final_s``."""

    setup_s: float
    epoch_s: float
    final_s: float
    source: str  # where the figures come from, said in the plan
    gpu: bool  # a GPU's figures: device time is GPU time

    def model_s(self, epochs: float) -> float:
        return self.setup_s + epochs * self.epoch_s + self.final_s + TRIAL_OVERHEAD_S


@dataclass
class StageCost:
    variant: str | None
    label: str
    kind: str
    models: int  # planned models
    left: int  # models still to train
    epochs: int  # per model
    es_epochs: float  # per model, nominal, with early stopping (tune stages)
    seconds: float  # device seconds of the models left, without early stopping
    es_seconds: float  # the same with early stopping
    searched: list[str]  # the knobs a tune stage searches


def check_price(value: str | None) -> float | None:
    """``--price-per-gpu-hour``: a finite number >= 0 (any currency), or None."""
    if value is None:
        return None
    try:
        price = float(value)
    except ValueError:
        price = float("nan")
    if not math.isfinite(price) or price < 0:
        raise WbsweepError(f"--price-per-gpu-hour must be a number >= 0 (e.g. 2.5), got {value!r}.")
    return price


# --- figures ---------------------------------------------------------------------------------------


def train_images(exp) -> int | None:
    """Training images per epoch of the spec's dataset, from the long-tailed profile (CIFAR, MNIST
    shapes; n_max = N/C - val_per_class, the authors' rule), or None for other datasets."""
    from trainables.config import DEFAULTS
    from trainables.data import DATASETS, lt_counts

    name = str(exp.train.get("dataset", DEFAULTS["dataset"]))
    base = name.removesuffix("-lt")
    if base not in ORIGINAL_TRAIN:
        return None
    n, c = ORIGINAL_TRAIN[base]
    rho = exp.train.get("rho") or DATASETS[name].default_rho
    val = int(exp.train.get("val_per_class", DEFAULTS["val_per_class"]))
    return sum(lt_counts(n // c - val, c, float(rho)))


_MEASURED: dict[tuple, Speed] = {}


def measure_here(exp, device: str = "auto", epochs: int = 6, log=None) -> Speed:
    """Train the spec's model for ``epochs`` epochs on this machine (as one trial runs: the spec's
    ``cpus_per_trial`` threads) and split the time as :func:`orchestrator.bench.speed.full_run` does."""
    import torch

    from orchestrator.bench.setup import data_kind, synthetic_dataset
    from trainables.config import DEFAULTS, resolve_config
    from trainables.data import load_dataset
    from trainables.methods import method_config
    from trainables.train import pick_device, train

    dev = pick_device(device)
    first = next((m.method for m in exp.methods if not m.method.parent), exp.methods[0].method)
    epochs = max(2, min(epochs, int(exp.train.get("epochs", DEFAULTS["epochs"]))))
    cached = (json.dumps(exp.train, sort_keys=True, default=str), first.name, dev.type, epochs,
              exp.resources.get("cpus_per_trial"))
    if cached in _MEASURED:  # the same measurement in this process (a spec's variants, several plans)
        return _MEASURED[cached]
    cfg = {**exp.train, **method_config(first, exp.hyper), "device": dev.type, "epochs": epochs, "seed": 0,
           "checkpoint_seconds": 1e9, "la": ["none", "add", "mult"], "analyses": [], "select": "last"}
    if dev.type == "cpu":  # a compilation would take most of a short measurement
        cfg["compile"] = "off"
    cfg = resolve_config(cfg)
    full, scale, what = train_images(exp), 1.0, "the spec's dataset"
    try:
        data = load_dataset(cfg["dataset"], cfg["data_root"], cfg["rho"], cfg["val_per_class"], download=False,
                            split=cfg["split"])
        full = len(data.y_train)
    except Exception:  # not installed here: synthetic data of its shape
        data, what = None, "synthetic data of the dataset's shape"
    budget = 4096 if cfg["model"].startswith(("mlp", "resblock")) else 512
    if data is None or (dev.type == "cpu" and len(data.y_train) > 4 * budget):
        data = synthetic_dataset(data_kind(cfg["model"]), budget, test_images=500)
        scale = (full or len(data.y_train)) / len(data.y_train)
        what = f"{len(data.y_train)} synthetic images of the dataset's shape, scaled to {full or len(data.y_train)}"
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(exp.resources.get("cpus_per_trial") or 1)))
    stamps: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="wbsweep-plan-") as tmp:
            t0 = time.perf_counter()
            train(cfg, tmp, report=lambda m: stamps.append(time.perf_counter()), data=data)
            t_end = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    steady = statistics.median([b - a for a, b in zip(stamps, stamps[1:], strict=False)] or [stamps[0] - t0])
    speed = Speed(max(0.0, stamps[0] - t0 - steady), steady * scale, t_end - stamps[-1],
                  f"measured here ({dev.type}): {epochs} epochs of {cfg['model']} on {what}", dev.type == "cuda")
    _MEASURED[cached] = speed
    if log:
        log(f"{speed.source}: {speed.epoch_s * 1000:.0f} ms per epoch, setup {speed.setup_s:.1f} s, "
            f"final evaluation {speed.final_s:.1f} s")
    return speed


def recorded_figures(device: str) -> dict[str, dict[str, Any]]:
    """model -> its ``full_run_<model>`` figures recorded for ``device`` (a name matched against the
    JSON files' device_name in bench/, or a JSON file); the first file that has a model wins."""
    files = [Path(device)] if device.endswith(".json") else sorted(BENCH_DIR.glob("results-*.json"))
    docs = []
    for f in files:
        try:
            docs.append((f, json.loads(f.read_text())))
        except (OSError, ValueError) as exc:
            if device.endswith(".json"):
                raise WbsweepError(f"--plan-device {f}: not a readable `wbsweep bench --json` file ({exc}).") from None
    # figures of the default knobs first (a run with another --set compile=... only where nothing else has it)
    docs.sort(key=lambda d: isinstance(d[1], dict) and d[1].get("compile") not in (None, "auto", "cudagraph"))
    out: dict[str, dict[str, Any]] = {}
    for f, doc in docs:
        if not isinstance(doc, dict):
            continue
        name = str(doc.get("device_name") or doc.get("device") or "").lower()
        if not device.endswith(".json") and device.lower() not in name.replace(" ", ""):
            continue
        for key, fig in doc.items():
            if key.startswith("full_run_") and isinstance(fig, dict) and "epoch_s" in fig:
                out.setdefault(fig.get("model", key.removeprefix("full_run_")), {**fig, "file": f.name})
    return out


def recorded_speed(exp, device: str) -> Speed:
    """The spec's model on ``device`` from recorded bench figures (see the module docstring)."""
    from orchestrator.bench.setup import data_kind
    from trainables.config import DEFAULTS

    model = str(exp.train.get("model", DEFAULTS["model"]))
    figs = recorded_figures(device)
    if not figs:
        names = sorted({p.stem.split("-")[1] for p in BENCH_DIR.glob("results-*.json")})
        raise WbsweepError(f"no figures recorded for device '{device}' (bench/ has {', '.join(names) or 'none'}); "
                           "record them there with `wbsweep bench --device cuda --full-run 12 --full-run-models "
                           f"{model} --json-out bench/results-{device}.json`, or use --plan-device here.")
    images = train_images(exp)
    if images is None or data_kind(model) != "cifar" or "cifar" not in str(exp.train.get("dataset", "")):
        raise WbsweepError(f"recorded figures are for CIFAR-shaped data; {exp.train.get('dataset')} with {model} "
                           "needs a measurement: --plan-device here on such a machine.")
    note = ""
    fig = figs.get(model)
    if fig is None:  # scale another device's figure of this model by a model both devices recorded
        for f in sorted(BENCH_DIR.glob("results-*.json")):
            other = recorded_figures(str(f))
            common = sorted(set(other) & set(figs))
            if model in other and common:
                ratio = other[model]["epoch_s"] / other[common[0]]["epoch_s"]
                ref = figs[common[0]]
                fig = {**ref, "epoch_s": ref["epoch_s"] * ratio,
                       "setup_and_first_epoch_s": other[model]["setup_and_first_epoch_s"] * (
                           ref["setup_and_first_epoch_s"] / other[common[0]]["setup_and_first_epoch_s"]),
                       "final_eval_s": other[model]["final_eval_s"]}
                note = f"; {model} scaled from {common[0]} by {f.name}'s {model}/{common[0]} ratio {ratio:.2f}"
                break
        if fig is None:
            raise WbsweepError(f"no figure for {model} recorded for '{device}' (recorded: {', '.join(sorted(figs))}); "
                               f"record it with `wbsweep bench --device cuda --full-run 12 --full-run-models {model}`.")
    epoch = fig["epoch_s"] * images / fig["images_per_epoch"]
    return Speed(max(0.0, fig["setup_and_first_epoch_s"] - fig["epoch_s"]), epoch, fig["final_eval_s"],
                 f"recorded by wbsweep bench ({fig['file']}){note}", True)


# --- the plan --------------------------------------------------------------------------------------


def stage_costs(exp, speed: Speed, store: str | None = None, out: Path | None = None,
                data_root: str | None = None, notes: list[str] | None = None) -> list[StageCost]:
    """The cost of each stage of ``exp`` (orchestrator.spec.experiment.stages), the models finished
    under the config hashes the spec resolves to now subtracted (orchestrator/report/finished.py);
    ``notes`` receives what the plan must say about that."""
    from orchestrator.report.finished import Finished
    from trainables.config import DEFAULTS
    from trainables.methods import method_config

    es = early_stop.settings(exp) or early_stop.parse("asha", "default")
    done = Finished(exp, store, out, data_root)
    costs = []
    for s in stages(exp):
        cfg = {**DEFAULTS, **exp.train, **method_config(s.entry.method, exp.hyper)}
        epochs = early_stop.stage_epochs(cfg)
        planned = done.planned(s)
        if s.kind == "tune":
            left = max(0, planned - done.tune_done(s))
            es_epochs = early_stop.expected_epochs(es, epochs, planned)
        else:
            left = done.repeat_left(s)
            es_epochs = float(epochs)
        costs.append(StageCost(exp.variant, s.label, s.kind, planned, left, epochs, es_epochs,
                               left * speed.model_s(epochs), left * speed.model_s(es_epochs),
                               list(exp.searched_for(s.entry.method)) if s.kind == "tune" else []))
    if notes is not None:
        notes += [n for n in done.notes if n not in notes]
    return costs


def slots(exp, speed: Speed) -> int:
    """Trials at once on this machine: its cores over the spec's cpus_per_trial (or max_concurrent)."""
    cpus = float(exp.resources.get("cpus_per_trial", 1)) or 1
    n = max(1, int((os.cpu_count() or 1) // cpus))
    if exp.resources.get("max_concurrent"):
        n = min(n, int(exp.resources["max_concurrent"]))
    return 1 if speed.gpu else n


def wall_seconds(costs: list[StageCost], exp, speed: Speed, early: bool) -> float:
    """This machine's wall time for the models left: the sweep's start plus the device seconds over
    the trials that run at once (the stages run side by side; their order is not modelled)."""
    total = sum(c.es_seconds if early and c.kind == "tune" else c.seconds for c in costs)
    return (SWEEP_START_S if total else 0.0) + total / slots(exp, speed)


def hours(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 360 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def print_plan(exps: list, speed_for, store: str | None, price: float | None, log=print, out: Path | None = None,
               data_root: str | None = None) -> list[StageCost]:
    """Print the plan of ``exps`` (the variants of one preset); ``speed_for(exp)`` gives the figures;
    the models finished in ``store`` (and ``out``: the tune stages' choices and studies) under the
    config hashes the spec resolves to now are subtracted."""
    exp = exps[0]
    lines: list[str] = []
    said: list[str] = []
    costs_all: list[StageCost] = []
    dev_h = [0.0, 0.0]  # device-hours (GPU-hours: times gpus_per_trial) without / with early stopping
    wall = [0.0, 0.0]
    gpu, missing, n_stages, n_models, n_left = False, [], 0, 0, 0
    for e in exps:
        if len(exps) > 1:
            lines.append(f"  variant {e.variant}: {e.train.get('dataset', 'digits-lt')}, "
                         f"{e.train.get('model', 'mlp3')}")
        try:
            speed = speed_for(e)
        except WbsweepError as exc:
            if len(exps) == 1 and not isinstance(exc, NoEstimate):
                raise
            lines.append(f"  no estimate: {exc}")
            missing.append(str(e.variant))
            costs = stage_costs(e, Speed(0.0, 0.0, 0.0, "none", False), store, out, data_root, said)
            for i, c in enumerate(costs, 1):
                extra = f" searching {', '.join(c.searched)}" if c.searched else ""
                lines.append(f"  {i:2d}. {c.label:<22} {c.models:3d} model(s), {c.left:3d} to train x {c.epochs:4d} "
                             f"epochs{extra}")
            n_stages += len(costs)
            n_models += sum(c.models for c in costs)
            n_left += sum(c.left for c in costs)
            continue
        costs = stage_costs(e, speed, store, out, data_root, said)
        costs_all += costs
        n_stages += len(costs)
        n_models += sum(c.models for c in costs)
        n_left += sum(c.left for c in costs)
        share = float(e.resources.get("gpus_per_trial", 0) or 1) if speed.gpu else 1.0
        gpu = gpu or speed.gpu
        lines.append(f"  figures: {speed.source}")
        for i, c in enumerate(costs, 1):
            extra = f" searching {', '.join(c.searched)}" if c.searched else ""
            es = f" (early stopping: ~{hours(c.es_seconds)})" if c.kind == "tune" and c.left else ""
            lines.append(f"  {i:2d}. {c.label:<22} {c.models:3d} model(s), {c.left:3d} to train x {c.epochs:4d} "
                         f"epochs: ~{hours(c.seconds)}{es}{extra}")
        for k, early in enumerate((False, True)):
            dev_h[k] += sum(c.es_seconds if early and c.kind == "tune" else c.seconds for c in costs) * share / 3600
            wall[k] += wall_seconds(costs, e, speed, early)
    n_var = f"{len(exps)} variants, " if len(exps) > 1 else ""
    log(f"{exp.name} preset {exp.preset}: {n_var}{n_stages} stages, {n_models} trials at most, "
        f"{n_left} models to train (finished work is subtracted: models of the config hashes the spec asks for now)")
    for line in lines:
        log(line)
    for line in said:
        log(f"  note: {line}")
    if not costs_all:
        return costs_all
    on = early_stop.settings(exp) is not None
    unit = "GPU-hours" if gpu else "device-hours"
    if missing and len(exps) > 1:
        log(f"  the totals leave out variant(s) {', '.join(missing)} (no figures)")
    which = "the spec's search_scheduler" if on else "search_scheduler: asha, defaults"
    log(f"  estimate: {dev_h[0]:.2f} {unit} without early stopping, {dev_h[1]:.2f} with it ({which}: ASHA, "
        "Li et al. 2020, as its asynchronous promotion works out on this many trials)"
        + ("" if on else "; this preset runs every search trial in full"))
    if not gpu:
        log(f"  estimated wall time on this machine ({slots(exp, speed)} trial(s) at once): "
            f"~{hours(wall[1] if on else wall[0])}" + (f" (~{hours(wall[0])} without early stopping)" if on else ""))
    if price is not None:
        log(f"  estimated cost at {price:g} per GPU-hour: {dev_h[0] * price:,.2f} without early stopping, "
            f"{dev_h[1] * price:,.2f} with it" + ("" if gpu else " (no GPU in these figures: device-hours priced)"))
    return costs_all


def wants_gpu(exp) -> bool:
    return float(exp.resources.get("gpus_per_trial", 0) or 0) > 0


def gpu_here() -> bool:
    import torch

    return torch.cuda.is_available()


def plan_command(exps: list, args) -> int:
    """``wbsweep run SPEC --plan``: check the options, find the figures, print the plan."""
    from pathlib import Path as _Path

    price = check_price(args.price_per_gpu_hour)
    device = str(args.plan_device).strip()
    if not device:
        raise WbsweepError("--plan-device needs a name: here, cpu, or a device recorded by wbsweep bench (h100, ...).")
    out = _Path(args.out)
    store = args.storage or (str(out.resolve()) if out.is_dir() else None)
    speeds: dict[tuple, Speed] = {}

    def speed_for(e) -> Speed:
        key = (e.train.get("dataset"), e.train.get("model"), e.train.get("width"))
        if key not in speeds:
            if device == "here" and wants_gpu(e) and args.device != "cpu" and not gpu_here():
                raise NoEstimate("the preset trains on GPUs (gpus_per_trial) and this machine has none: "
                                   "--plan-device h200 (or another GPU recorded in bench/) estimates it")
            if device in ("here", "cpu"):
                speeds[key] = measure_here(e, "cpu" if device == "cpu" else args.device)
            else:
                speeds[key] = recorded_speed(e, device)
        return speeds[key]

    print_plan(exps, speed_for, store, price, out=out if out.is_dir() else None, data_root=args.data_root)
    return 0
