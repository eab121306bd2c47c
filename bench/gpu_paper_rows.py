"""Table 8's paper-scale rows on one GPU, without Ray, Optuna, MLflow, pandas or pyarrow (issue #29).

Trains the ``table8`` spec's ``paper`` preset methods ``naive`` and ``wd_fr_etf`` (CIFAR-10-LT at
rho 100, the authors' CIFAR ResNet34, 320 epochs, lambda 5e-3, zeta 0.02: the preset searches
neither, so each method is one repeat stage of fixed hyperparameters) exactly as a sweep's repeat
stage trains them: the training config is resolved as the sweep resolves it
(orchestrator/sweep/stages.py ``first_stage_config``, ``SweepContext.trial_config``,
trainables/trial.py ``training_config``, the machine keys of orchestrator/sweep/driver.py
``Sweep.machine``), so the config hash is a sweep's (tests/test_gpu_paper_rows.py drives the sweep's
own stage graph and compares). Every model is evaluated with all three LA variants (none, add,
mult) by the trainer itself, and the rows are compared with the paper's Table 8
(orchestrator/spec/reference/paper_accuracy_tables.csv).

    PYTHONPATH=. python bench/gpu_paper_rows.py [--out DIR] [--methods naive wd_fr_etf] [--seeds 0 [1]]
        [--device cuda] [--data-root ROOT | --packed NPZ] [--fused [on|auto]] [--work DIR]
        [--epochs N --images N]   # a dry run: fewer epochs, a subset of the images

Data: ``--data-root ROOT`` holds ``cifar-10-batches-py/``; by default the packed CIFAR-10-LT
``bench/data/c10lt.npz`` (git-ignored; ../shared/data/README.md) is unpacked once into
``WORK/data`` by ``bench/data/cifar10_lt_pack.py``. The split's data fingerprint must be the full
CIFAR-10's (``FULL_FINGERPRINT``: the packed file gives the same split, checked), else the script
refuses: the hash would not be a sweep's. Prepare the folder here, once:

    python ../shared/data/get_cifar10.py /tmp/c10 && mkdir -p bench/data
    python ../shared/data/cifar10_lt_pack.py pack /tmp/c10 bench/data/c10lt.npz   # 39 MB, ~1 min
    cp ../shared/data/cifar10_lt_pack.py ../shared/data/get_cifar10.py bench/data/

Models train in ``WORK/runs/<config hash>/seed<k>/`` (``--work``, default /tmp/wbsweep-paper-rows):
a finished model there is reused, not trained again, and a model cut off mid-run resumes from its
checkpoint (saved every 60 s), so a second command on the same warm machine goes on where the first
stopped. What ``--out`` (default ``$OUT``) receives, as it goes (at most 6 files for 4 models: the
device tool brings back 8):

* ``progress.log``: a line per epoch and model, and one per model started or finished;
* ``<method>-s<seed>/history.jsonl``: the model's epochs, one JSON line each, flushed; replaced by
* ``<method>-s<seed>/metrics.json`` when it finishes: the trainer's metrics (LA variants, FDR, the
  whole history, train/eval seconds) with ``paper_rows``: both config hashes, wall seconds,
  seconds per epoch, the device;
* ``table8-paper-rows.json``: rewritten after each model and at the end: per method and LA variant
  ours (mean, and std over seeds when there are several) beside the paper's mean +- std for
  Many/Medium/Few/Average and train/test FDR (Table 8 gives both with their std), and whether ours
  lies within two of the paper's standard deviations.

A dry run (``--epochs``/``--images``: a class-proportional subset of the training images and
class-balanced ones of the validation and test images; Many/Medium/Few and the LA prior stay the
full split's)
trains another config: its hash is recorded beside the sweep's and the JSON says ``dry_run``.

``--fused on`` trains the methods of each seed as one fused group (K = 2, trainables/fused.py
``train_fused``; their fusion keys are equal: they differ only in wd, fr, the classifier, none of
them shared keys); ``--fused auto`` first measures K = 1 against K = 2 with the probe of
``fuse: auto`` (trainables/fuse_probe.py, about 20-40 s) and fuses only if that pays (>= 1.15x).
Fusing changes rounding, not the config hash.

Device time (docs/performance.md "Paper-scale rows: how to run"): ResNet34 trained at 0.889 s per
epoch of 10,457 CIFAR-shaped images on an H200 (train() with validation, bench/results-h200-
gpu_check.json; the H100 ran resnet32 within 1.5 % of the H200), so CIFAR-10-LT's 12,360 images
take about 1.05 s per epoch: one 320-epoch model about 5.8 minutes (336 s of epochs, ~12 s setup
and capture, ~3 s evaluation), the two one after the other about 11.7 minutes on an H100 or H200.
That does not fit one command (10 minutes) and leaves little of a 15-minute lease after the
machine's start (1-2 minutes): two commands back to back on the warm machine, one model each; seed
1 does not fit. K = 2 fused has not been measured on a GPU for resnet34: it fits one command only if
it pays at least 1.2x (2 x 336 s / 1.2 = 560 s); ``--fused auto`` decides in the same run. The
commands (device tool ``run``; bench/data is carried, 39 MB):

    run(command="PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_paper_rows.py --methods naive",
        carry=["bench/data"], timeout_s=600)
    run(command="PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_paper_rows.py", carry=["bench/data"],
        timeout_s=600)      # naive reused from the first command's WORK, wd_fr_etf trained, the table
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from orchestrator.spec.experiment import Experiment, MethodEntry, load_experiment  # noqa: E402
from trainables.config import DEFAULTS, config_hash  # noqa: E402
from trainables.data import LTDataset, data_fingerprint  # noqa: E402
from trainables.datacache import cached_dataset  # noqa: E402
from trainables.errors import WbsweepError  # noqa: E402
from trainables.methods import method_config  # noqa: E402
from trainables.trial import training_config  # noqa: E402

SPEC, PRESET, TABLE = "table8", "paper", "8"
METHODS = ("naive", "wd_fr_etf")
LA = ("none", "add", "mult")
ACCURACY = ("many", "medium", "few", "avg")
FDR = ("fdr_train", "fdr_test")
#: The data fingerprint of CIFAR-10-LT (rho 100, 20 validation images per class, the official test
#: set) from the full CIFAR-10 (../shared/data/get_cifar10.py) and from bench/data/c10lt.npz unpacked:
#: the same (checked when this script was written; tests/test_gpu_paper_rows.py checks the full one).
FULL_FINGERPRINT = "b94b6627b07abead"
PACKED = ROOT / "bench" / "data" / "c10lt.npz"
WORK = Path(tempfile.gettempdir()) / "wbsweep-paper-rows"
REFERENCE = ROOT / "orchestrator" / "spec" / "reference" / "paper_accuracy_tables.csv"
ROWS_FILE = "table8-paper-rows.json"


# --- the config a sweep's repeat stage trains ---------------------------------------------------

def sweep_machine(exp: Experiment, data_root: str | Path | None, fingerprint: str, device: str) -> dict[str, Any]:
    """What ``Sweep.machine`` adds to every training config (driver.py): the device, the threads
    (a trial's CPUs: the preset's cpus_per_trial), the data root made absolute, the fingerprint."""
    return {"data_fingerprint": fingerprint, "device": device,
            "threads": max(1, int(exp.resources.get("cpus_per_trial", 1))),
            "data_root": str(Path(data_root).expanduser().resolve()) if data_root else None}


def method_entry(exp: Experiment, method: str) -> MethodEntry:
    """``method``'s entry in the spec. Refuses a method the spec lacks, a second stage (WB: its
    parent's model) and a method the preset searches (its config is a search's choice)."""
    entry = next((e for e in exp.methods if e.method.name == method), None)
    if entry is None:
        names = ", ".join(e.method.name for e in exp.methods)
        raise WbsweepError(f"{exp.name} has no method {method!r}; it has {names}.")
    if entry.method.parent or (exp.searched_for(entry.method) and exp.trials > 0):
        raise WbsweepError(f"{exp.name}/{exp.preset} {method}: a second stage or a searched method is not one fixed "
                           "config; this script trains first-stage methods the preset does not search.")
    return entry


def repeat_config(exp: Experiment, method: str, seed: int, machine: dict[str, Any], runs: str | Path) -> dict[str, Any]:
    """The resolved training config of ``method``'s repeat stage at ``seed``, as a sweep's trial gets
    it: ``first_stage_config`` (the spec's train options, the method's knobs with the preset's fixed
    hyperparameters, its LA variants, the machine keys), then ``SweepContext.trial_config`` (seed,
    ``_runs``), then ``training_config``."""
    entry = method_entry(exp, method)
    cfg: dict[str, Any] = dict(exp.train)
    cfg.update(method_config(entry.method, exp.hyper))
    cfg["la"] = list(entry.la)
    cfg.update(machine)
    return training_config({**cfg, "seed": seed, "_runs": str(runs)})


# --- data -----------------------------------------------------------------------------------------

def unpacked_root(packed: Path, work: Path) -> Path:
    """``work/data`` holding CIFAR-10 unpacked from ``packed`` (once; again when the .npz changes)."""
    if not packed.is_file():
        raise WbsweepError(f"no data: {packed} does not exist; give --data-root ROOT (holding cifar-10-batches-py/) "
                           "or pack CIFAR-10-LT there (see this script's docstring).")
    tool = packed.parent / "cifar10_lt_pack.py"
    if not tool.is_file() or not (packed.parent / "get_cifar10.py").is_file():
        raise WbsweepError(f"{packed.parent} lacks cifar10_lt_pack.py or get_cifar10.py "
                           "(copy both from ../shared/data).")
    root, stamp = work / "data", f"{packed.stat().st_size} {packed.stat().st_mtime_ns}"
    if (root / "packed-from").is_file() and (root / "packed-from").read_text() == stamp:
        return root
    tmp = work / f"data.tmp{os.getpid()}"
    proc = subprocess.run([sys.executable, str(tool), "unpack", str(packed), str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise WbsweepError(f"unpacking {packed} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    (tmp / "packed-from").write_text(stamp)
    if root.exists():
        os.replace(root, work / f"data.old{os.getpid()}")
    os.replace(tmp, root)
    return root


def subset(data: LTDataset, images: int) -> LTDataset:
    """A dry run's data: per class the first ``images`` x n_k / n training images (at least one), and
    the first ``images`` / C validation and test images (at least one); the class counts (Many/Medium/
    Few, the LA prior) stay the full split's."""
    c = data.num_classes
    counts = torch.bincount(data.y_train, minlength=c).tolist()

    def first(y: torch.Tensor, per_class: list[int]) -> torch.Tensor:
        return torch.sort(torch.cat([torch.nonzero(y == k).flatten()[:n] for k, n in enumerate(per_class)])).values

    tr = first(data.y_train, [max(1, round(images * n / sum(counts))) for n in counts])
    va, te = first(data.y_val, [max(1, images // c)] * c), first(data.y_test, [max(1, images // c)] * c)
    return dataclasses.replace(data, x_train=data.x_train[tr], y_train=data.y_train[tr], x_val=data.x_val[va],
                               y_val=data.y_val[va], x_test=data.x_test[te], y_test=data.y_test[te], indices={},
                               fingerprint="")


# --- output files -------------------------------------------------------------------------------

def write_json(path: Path, doc: Any) -> None:
    """Atomically: a cut run leaves the previous version whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    os.replace(tmp, path)


def append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:  # closed (flushed) at once: what a cut run leaves is on disk
        fh.write(line.rstrip("\n") + "\n")


def finished(folder: Path) -> dict[str, Any] | None:
    """A finished model's metrics.json in a local run folder (read without trainables.storage's pyarrow)."""
    try:
        doc = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class Model:
    """One (method, seed): its sweep config, the config it trains (the same unless a dry run), where."""

    def __init__(self, method: str, seed: int, sweep_cfg: dict[str, Any], cfg: dict[str, Any], work: Path, out: Path):
        self.method, self.seed, self.sweep_cfg, self.cfg = method, seed, sweep_cfg, cfg
        self.name = f"{method}-s{seed}"
        self.hash, self.sweep_hash = config_hash(cfg), config_hash(sweep_cfg)
        self.run = work / "runs" / self.hash / f"seed{seed}"
        self.out = out / self.name
        self.started = self.last = 0.0
        self.metrics: dict[str, Any] | None = None  # the trainer's
        self.record: dict[str, Any] | None = None  # this script's: the hashes, how, the wall time
        self.error: str | None = None

    def epoch(self, row: dict[str, Any], log: Path) -> None:
        now = time.time()
        step, self.last = now - self.last, now
        append(self.out / "history.jsonl", json.dumps({**row, "epoch_wall_s": round(step, 3),
                                                       "elapsed_s": round(now - self.started, 2)}))
        left = (self.cfg["epochs"] - row["epoch"]) * step
        append(log, f"{time.strftime('%H:%M:%S')} {self.name} epoch {row['epoch']}/{self.cfg['epochs']} "
                    f"loss {row['train_loss']:.4f} val_acc {row['val_acc']:.1f} lr {row['lr']:.5f} "
                    f"{step:.2f} s/epoch, about {left / 60:.1f} min left")

    def done(self, metrics: dict[str, Any], wall: float, how: str, device_name: str, log: Path) -> None:
        self.metrics = metrics
        self.record = record = {"config_hash": self.hash, "sweep_config_hash": self.sweep_hash,
                  "same_as_sweep": self.hash == self.sweep_hash, "how": how, "wall_seconds": round(wall, 2),
                  "seconds_per_epoch": round(metrics["train_seconds"] / max(1, metrics["epochs"]), 4),
                  "device_name": device_name, "run_folder": str(self.run)}
        write_json(self.out / "metrics.json", {**metrics, "paper_rows": record})
        (self.out / "history.jsonl").unlink(missing_ok=True)  # metrics.json holds the whole history
        la = metrics["la"]
        append(log, f"{time.strftime('%H:%M:%S')} {self.name} {how} in {wall:.0f} s: avg acc none/add/mult "
                    f"{la['none']['avg']:.1f}/{la['add']['avg']:.1f}/{la['mult']['avg']:.1f}, "
                    f"FDR test {metrics['fdr_test']:.1f}")


# --- the comparison with the paper --------------------------------------------------------------

def paper_rows(path: Path = REFERENCE) -> dict[tuple[str, str], dict[str, float | None]]:
    """Table 8 of the paper: (method, la) -> its numbers (None where the paper prints none)."""
    out = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["table"] == TABLE:
                out[(row["method"], row["la"])] = {k: (float(v) if v != "" else None) for k, v in row.items()
                                                   if k.startswith(("acc_", "fdr_"))}
    return out


def compare(models: list[Model], exp: Experiment) -> list[dict[str, Any]]:
    """Per method and LA variant: ours (mean, std over seeds when several) beside the paper's."""
    paper, rows = paper_rows(), []
    for method in dict.fromkeys(m.method for m in models):
        done = [m for m in models if m.method == method and m.metrics is not None]
        entry = next(e for e in exp.methods if e.method.name == method)
        for la in LA:
            ours: dict[str, Any] = {}
            for key in (*ACCURACY, *FDR):
                values = [m.metrics[key] if key in FDR else m.metrics["la"][la][key] for m in done]  # type: ignore[index]
                name = key if key in FDR else f"acc_{key}"
                ours[name] = statistics.fmean(values) if values else None
                ours[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
            ref = paper.get((method, la))
            within = None
            if ref is not None and done:
                within = {k: (abs(ours[k] - ref[k]) <= 2 * ref[f"{k}_std"] if ref[f"{k}_std"] is not None else None)
                          for k in ours if not k.endswith("_std") and ref.get(k) is not None}
            rows.append({"method": method, "label": entry.method.label, "la": la, "in_spec": la in entry.la,
                         "seeds": [m.seed for m in done], "ours": ours, "paper": ref,
                         "within_2_paper_std": within,
                         **({} if ref else {"note": "the paper's Table 8 has no row for this LA variant"})})
    return rows


# --- training -----------------------------------------------------------------------------------

def train_one(m: Model, data: LTDataset, device_name: str, log: Path) -> None:
    from trainables.train import TrainingDiverged, train

    m.started = m.last = time.time()
    append(log, f"{time.strftime('%H:%M:%S')} {m.name} training ({m.hash}, {m.run})")
    try:
        metrics = train(m.cfg, m.run, report=lambda row: m.epoch(row, log), data=data)
    except TrainingDiverged as exc:
        m.error = str(exc)
        append(log, f"{m.name} failed: {exc}")
        return
    m.done(metrics, time.time() - m.started, "trained", device_name, log)


def train_group(group: list[Model], data: LTDataset, device_name: str, log: Path) -> None:
    from trainables.fused import train_fused

    t0 = time.time()
    for m in group:
        m.started = m.last = t0
        append(log, f"{time.strftime('%H:%M:%S')} {m.name} training fused K={len(group)} ({m.hash}, {m.run})")
    results = train_fused([m.cfg for m in group], [m.run for m in group], data=data,
                          report=lambda rows: [group[i].epoch(row, log) for i, row in rows.items()])
    for m, r in zip(group, results, strict=True):
        if isinstance(r, Exception):
            m.error = str(r)
            append(log, f"{m.name} failed: {r}")
        else:
            m.done(r, time.time() - t0, f"trained fused K={len(group)}", device_name, log)


def should_fuse(mode: str, models: list[Model], data: LTDataset, report: dict[str, Any], log: Path) -> bool:
    """``on``: fuse (the fusion keys must agree); ``auto``: only if the probe finds K = 2 pays."""
    from trainables.fused import fusion_key

    if mode == "off" or len(models) < 2:
        return False
    keys = {fusion_key(m.cfg) for m in models}
    if len(keys) != 1 or None in keys:
        raise WbsweepError(f"--fused: {', '.join(m.name for m in models)} have different fusion keys "
                           "(trainables/fused.py SHARED_KEYS); train them without --fused.")
    report["fusion_key_equal"] = True
    if mode == "on":
        return True
    from trainables.fuse_probe import probe_fusion

    probe = probe_fusion(models[0].cfg, k_max=2, budget_s=60.0, data=data)
    report["fusion_probe"] = probe.as_dict()
    append(log, f"{time.strftime('%H:%M:%S')} fusion probe ({probe.seconds:.0f} s): K={probe.k}, {probe.reason}")
    return probe.k >= 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=os.environ.get("OUT") or None, help="default $OUT")
    p.add_argument("--work", type=Path, default=WORK, help=f"the models' folders and the data (default {WORK})")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (not hashed; default: the preset's "
                                                                 "cpus_per_trial, as a sweep's trial)")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--packed", type=Path, default=PACKED)
    p.add_argument("--epochs", type=int, default=None, help="dry run: train N epochs (another config hash)")
    p.add_argument("--images", type=int, default=None, help="dry run: about N train, val, test images")
    p.add_argument("--fused", nargs="?", const="on", default="off", choices=["on", "auto", "off"])
    p.add_argument("--allow-other-data", action="store_true",
                   help="train on data whose fingerprint is not CIFAR-10-LT's (a check of the script only)")
    args = p.parse_args(argv)
    try:
        return run(args)
    except WbsweepError as exc:
        print(f"gpu_paper_rows: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        raise WbsweepError("give --out DIR (on the device machine $OUT is used).")
    if (args.out / ROWS_FILE).exists():
        raise WbsweepError(f"{args.out} already holds a run's {ROWS_FILE}; give another --out (models finished in "
                           f"{args.work} are reused, not trained again).")
    for n, what in ((args.epochs, "--epochs"), (args.images, "--images"), (args.threads, "--threads")):
        if n is not None and n < 1:
            raise WbsweepError(f"{what} must be a whole number from 1, got {n}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise WbsweepError(f"--device cuda, but torch {torch.__version__} finds no usable GPU; "
                           "--device cpu for a dry run.")
    exp = load_experiment(SPEC, PRESET)
    args.methods, args.seeds = list(dict.fromkeys(args.methods)), list(dict.fromkeys(args.seeds))
    for method in args.methods:  # before any data is read
        method_entry(exp, method)
    if any(s < 0 for s in args.seeds):
        raise WbsweepError(f"--seeds must be whole numbers from 0, got {args.seeds}.")
    root = args.data_root if args.data_root is not None else unpacked_root(args.packed, args.work)
    opts = {**DEFAULTS, **exp.train}  # as the driver's preflight reads the dataset
    full = cached_dataset(opts["dataset"], str(root), opts["rho"], opts["val_per_class"], opts["split"])
    fingerprint = data_fingerprint(full)
    if fingerprint != FULL_FINGERPRINT and not args.allow_other_data:
        raise WbsweepError(f"the data in {root} have fingerprint {fingerprint}, not the full CIFAR-10-LT's "
                           f"{FULL_FINGERPRINT}: the config hash would not be a sweep's on the real data.")
    machine = sweep_machine(exp, root, fingerprint, args.device)
    data = full if args.images is None else subset(full, args.images)
    dry = args.epochs is not None or args.images is not None
    models = []
    for seed in args.seeds:
        for method in args.methods:
            sweep_cfg = repeat_config(exp, method, seed, machine, args.work / "runs")
            cfg = dict(sweep_cfg)
            if args.epochs is not None:
                cfg["epochs"] = args.epochs
            if args.images is not None:
                cfg["data_fingerprint"] = data_fingerprint(data)
            if args.threads is not None:
                cfg["threads"] = args.threads
            models.append(Model(method, seed, sweep_cfg, cfg, args.work, args.out))
    device_name = torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {
        "spec": SPEC, "preset": PRESET, "paper_table": int(TABLE), "dry_run": dry, "epochs": args.epochs,
        "images": args.images, "device": args.device, "device_name": device_name, "torch": torch.__version__,
        "data": {"root": str(root), "fingerprint": fingerprint, "full_cifar10_lt_fingerprint": FULL_FINGERPRINT,
                 "same_as_full": fingerprint == FULL_FINGERPRINT,
                 "trained_on": {"train": len(data.y_train), "val": len(data.y_val), "test": len(data.y_test)}},
        "fused": args.fused, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    log = args.out / "progress.log"
    t0 = time.time()

    def write_rows(state: str) -> None:
        report.update(state=state, wall_seconds=round(time.time() - t0, 1), models=[
            {"method": m.method, "seed": m.seed, "config_hash": m.hash, "sweep_config_hash": m.sweep_hash,
             "same_as_sweep": m.hash == m.sweep_hash, "error": m.error,
             **({k: m.metrics.get(k) for k in ("train_seconds", "eval_seconds", "epochs", "best_epoch", "fused_k")}
                if m.metrics else {}), "paper_rows": m.record}
            for m in models], rows=compare(models, exp))
        write_json(args.out / ROWS_FILE, report)

    write_rows("started")  # the configs and hashes, before anything trains
    for m in models:  # finished earlier in WORK: reused, as a sweep reuses a finished model
        metrics = finished(m.run)
        if metrics is not None:
            m.done(metrics, 0.0, "reused", metrics.get("device", "?"), log)
    for seed in args.seeds:
        todo = [m for m in models if m.seed == seed and m.metrics is None]
        if todo and should_fuse(args.fused, todo, data, report, log):
            train_group(todo, data, device_name, log)
            write_rows("running")
            continue
        for m in todo:
            train_one(m, data, device_name, log)
            write_rows("running")
    write_rows("finished")
    for row in report["rows"]:
        if row["paper"] and row["seeds"]:
            ok = row["within_2_paper_std"]
            ours, paper = row["ours"], row["paper"]
            print(f"{row['label']:>10} {row['la']:>4}: avg {ours['acc_avg']:.1f} (paper {paper['acc_avg']} "
                  f"+- {paper['acc_avg_std']}), within 2 std: "
                  f"{sum(bool(v) for v in ok.values())}/{len(ok)} of {', '.join(ok)}")
    print(f"wrote {args.out / ROWS_FILE}")
    return 1 if any(m.error for m in models) else 0


if __name__ == "__main__":
    sys.exit(main())
