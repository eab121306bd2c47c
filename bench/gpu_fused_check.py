"""Fused training of the convolutional models on one GPU (issue #14; run by bench/gpu_fused_check.sh).

For each model (default resnet32 and resnet34, the paper's widths) at batch 64 on synthetic
CIFAR100-LT-shaped data (orchestrator/bench/setup.py's ``synthetic_dataset``: random pixels, the real
shapes and label profile, nothing to download):

* the single-model trainer (trainables/runner.py's EpochRunner) with its default knobs (on a GPU: the whole step
  as a CUDA graph, channels_last) and with eager steps (compile off): images/s;
* K = 1, 2, 4, 8, 16 models fused (trainables/fused.py: one grouped convolution per layer for the K
  models, HFTA-style), in the variants of ``--variants``: "graph" (the default knobs: on a GPU the
  whole fused step as one CUDA graph, channels_last), "eager" (channels_last, eager steps), "nchw"
  (eager, NCHW): per-model images/s = K x images / time, and its ratio to fused K=1 and to the
  single-model trainer;
* what ``fuse: auto`` would choose for the model on this GPU (trainables/fuse_probe.py: its ladder of
  per-model throughputs, the memory per model and the K), unless ``--no-probe``;
* the Table 4 paper-preset estimate: 30 models x 320 epochs x 10,847 CIFAR100-LT training images in
  GPU-minutes = 30 * 320 * 10847 / (per-model img/s) / 60, at the best K and with the single trainer.

Each measurement: one warm-up epoch (cuDNN's algorithm choice, the allocator, the graph capture),
then ``--epochs`` timed epochs of ``--images`` images per model, the device synchronised around them.
A time budget (``--budget-s``) skips what would not finish; a failure (e.g. out of memory) is
recorded and the rest goes on; killed by SIGTERM (the shell script's ``timeout``), it still prints
what it measured. Prints one JSON object on stdout, progress on stderr.

    python bench/gpu_fused_check.py                       # the GPU defaults
    python bench/gpu_fused_check.py --device cpu --models resnet32 --width 4 --ks 1,2 --images 128
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.bench.setup import bench_config, device_name, synthetic_dataset  # noqa: E402
from trainables.device_data import DeviceData  # noqa: E402
from trainables.fuse_probe import probe_fusion  # noqa: E402
from trainables.fused import build_runs  # noqa: E402
from trainables.fused_model import FusedModels  # noqa: E402
from trainables.train import build_training, pick_device  # noqa: E402

#: The fused runs' knobs per ``--variants`` name ("graph": the defaults, a CUDA graph on a GPU).
VARIANTS = {"graph": {"compile": "auto", "channels_last": True}, "eager": {"compile": "off", "channels_last": True},
            "nchw": {"compile": "off", "channels_last": False}}

#: Table 4's paper preset: 30 trainings (methods x seeds) of 320 epochs on CIFAR100-LT (rho 100).
TABLE4_MODELS, TABLE4_EPOCHS, CIFAR100_LT_TRAIN = 30, 320, 10847


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table4_minutes(img_per_s_per_model: float) -> float:
    """GPU-minutes for Table 4's 30 x 320 epochs of CIFAR100-LT at this per-model rate."""
    return TABLE4_MODELS * TABLE4_EPOCHS * CIFAR100_LT_TRAIN / img_per_s_per_model / 60


def time_single(cfg: dict[str, Any], dd: DeviceData, epochs: int) -> float:
    """Images/s of one model trained by runner.py's EpochRunner (knobs from ``cfg``)."""
    torch.manual_seed(cfg["seed"])
    run = build_training(cfg, dd)
    runner = run.runner()
    runner.epoch()  # warm-up (and the CUDA-graph capture)
    sync(dd.device)
    t0, n = time.perf_counter(), 0
    for _ in range(epochs):
        loss_sum, seen = runner.epoch()
        float(loss_sum)
        n += seen
    return n / (time.perf_counter() - t0)


def time_fused(cfgs: list[dict[str, Any]], dd: DeviceData, epochs: int) -> float:
    """Per-model images/s of the K configs ``cfgs`` trained as one fused group."""
    group = FusedModels(build_runs(cfgs, dd), dd)
    group.set_lr([c["lr"] for c in cfgs])
    group.epoch()  # warm-up
    sync(dd.device)
    t0, n = time.perf_counter(), 0
    for _ in range(epochs):
        loss_sum, seen = group.epoch()
        loss_sum.tolist()
        n += len(cfgs) * seen
    return n / (time.perf_counter() - t0)


class Stopped(BaseException):  # not an Exception: a measurement's failure handler must not catch it
    """SIGTERM arrived (the time limit of bench/gpu_fused_check.sh)."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped


def main(argv: list[str] | None = None, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure as the command line ``argv`` says; ``result`` (filled in place as the figures come,
    so a caller keeps them when a signal stops the run) is returned."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="resnet32,resnet34")
    p.add_argument("--width", type=int, help="model width (default: the model's own, the paper's)")
    p.add_argument("--ks", default="1,2,4,8,16", help="group sizes K")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=2048, help="training images per model per epoch")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per measurement (after one warm-up)")
    p.add_argument("--variants", default="graph,eager", help="fused runs' variants: graph, eager, nchw")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="skip what `fuse: auto` would choose (trainables/fuse_probe.py, about 10-20 s per model)")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip measurements once this much time is spent")
    args = p.parse_args(argv)
    started = time.perf_counter()
    dev = pick_device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ks = [int(k) for k in args.ks.split(",")]
    result = {} if result is None else result
    result.update({"device": dev.type, "device_name": device_name(dev), "torch": torch.__version__,
                   "batch_size": args.batch_size, "images_per_model_per_epoch": args.images,
                   "timed_epochs": args.epochs, "ks": ks, "models": {}, "failures": []})
    data = synthetic_dataset("cifar", args.images)
    dd = DeviceData(data, dev, "auto")
    result["images_per_model_per_epoch"] = len(data.y_train)

    def over_budget(what: str) -> bool:
        if time.perf_counter() - started > args.budget_s:
            result["failures"].append(f"{what}: skipped, time budget of {args.budget_s:g} s spent")
            return True
        return False

    def attempt(what: str, fn) -> float | None:
        if over_budget(what):
            return None
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 -- recorded, and the other measurements go on
            result["failures"].append(f"{what}: {type(exc).__name__}: {exc}")
            log(traceback.format_exc(limit=3))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            return None
        log(f"  {what}: {value:,.0f} img/s per model")
        return round(value, 1)

    for model in args.models.split(","):
        log(f"== {model} (width {args.width or 'default'}, batch {args.batch_size}) on {device_name(dev)}")

        def cfg(seed: int, model: str = model, **over: Any) -> dict[str, Any]:
            return bench_config(model, args.device, args.batch_size, args.width, {"seed": seed, **over})

        row: dict[str, Any] = {"width": args.width, "single": {}, "fused": {}}
        result["models"][model] = row
        row["single"]["default_knobs"] = attempt(f"{model} single, default knobs",
                                                 lambda: time_single(cfg(0), dd, args.epochs))
        for j, variant in enumerate(args.variants.split(",")):
            if j == 1:  # the eager single trainer after the first variant's figures
                row["single"]["eager"] = attempt(f"{model} single, eager",
                                                 lambda: time_single(cfg(0, compile="off"), dd, args.epochs))
            rates: dict[str, float | None] = {}
            row["fused"][variant] = rates
            for k in ks:
                cfgs = [cfg(s, **VARIANTS[variant]) for s in range(k)]
                rates[str(k)] = attempt(f"{model} fused K={k} {variant}", lambda cfgs=cfgs: time_fused(cfgs, dd,
                                                                                                      args.epochs))
        if "eager" not in row["single"]:
            row["single"]["eager"] = attempt(f"{model} single, eager",
                                             lambda: time_single(cfg(0, compile="off"), dd, args.epochs))
        if args.probe and not over_budget(f"{model} fuse-auto probe"):
            try:  # what `fuse: auto` would choose for this model here (trainables/fuse_probe.py)
                row["auto_probe"] = probe_fusion(cfg(0), data=data).as_dict()
                log(f"  {model} fuse auto: K={row['auto_probe']['k']} ({row['auto_probe']['reason']})")
            except Exception as exc:  # noqa: BLE001 -- recorded, and the other measurements go on
                result["failures"].append(f"{model} fuse-auto probe: {type(exc).__name__}: {exc}")
        summarise(row)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def summarise(row: dict[str, Any]) -> None:
    """A model's best fused figure, its ratios and the Table 4 estimates, from what was measured."""
    measured = [(v, k, lay) for lay, rates in row["fused"].items() for k, v in rates.items() if v]
    single = row["single"]
    if measured:
        best, k, lay = max(measured)
        one = row["fused"][lay].get("1")
        row["best"] = {"k": int(k), "variant": lay, "img_per_s_per_model": best,
                       "vs_fused_k1": round(best / one, 2) if one else None,
                       "vs_single_default": round(best / single["default_knobs"], 2)
                       if single.get("default_knobs") else None,
                       "vs_single_eager": round(best / single["eager"], 2) if single.get("eager") else None,
                       "table4_gpu_minutes": round(table4_minutes(best), 1)}
        row["ratio_to_k1"] = {lay: {k: round(v / rates["1"], 2) if v and rates.get("1") else None
                                    for k, v in rates.items()} for lay, rates in row["fused"].items()}
    singles = [v for v in single.values() if v]
    if singles:
        row["table4_gpu_minutes_single_trainer"] = round(table4_minutes(max(singles)), 1)
    row["table4_formula"] = (f"GPU-minutes = {TABLE4_MODELS} models * {TABLE4_EPOCHS} epochs * "
                             f"{CIFAR100_LT_TRAIN} images / (per-model img/s) / 60")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    out: dict[str, Any] = {}
    try:
        main(result=out)
    except Stopped:
        out.setdefault("failures", []).append("stopped by SIGTERM (the time limit): the figures so far")
        for row in out.get("models", {}).values():
            summarise(row)
    print(json.dumps(out, indent=1))
    sys.exit(1 if out["failures"] else 0)
