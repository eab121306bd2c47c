"""Fused training's benchmark (``wbsweep bench --fused K``): K models trained as one
(trainables/fused.py) against the same K models trained one after the other.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from orchestrator.bench.setup import (
    Log,
    bench_config,
    data_kind,
    default_images,
    device_name,
    load_average,
    synthetic_dataset,
)
from trainables.device_data import DeviceData
from trainables.errors import WbsweepError
from trainables.train import build_training, pick_device


def fused(device: str = "cpu", model: str = "mlp3", k: int = 5, batch_size: int = 64, width: int | None = 128,
          rounds: int = 3, dataset: str = "digits-lt", images: int | None = None,
          overrides: dict[str, Any] | None = None, log: Log = print) -> dict[str, Any]:
    """K models (seeds 0..K-1) trained fused (trainables/fused.py) against the same K trained one after
    the other with train()'s :class:`~trainables.runner.EpochRunner`, in one process, alternating: a
    warm-up round, then ``rounds`` timed rounds of one epoch of each of the K sequential models and
    one fused epoch. Training only (no validation), as :func:`compare`.

    ``dataset``: "digits-lt" (the cpu preset's data: its config, lr 0.05 and the MLP of width 128),
    or "synthetic" (MNIST- or CIFAR-shaped, :func:`synthetic_dataset`, ``images`` per epoch).
    Per-model images per second count every model's images: K x the epoch's images over the time the
    K models took, so the sequential figure is one model's rate alone, and ``fused_speedup`` is how
    many times faster the K models train fused than one after the other."""
    from trainables.fused import build_fused, check_fusable
    from trainables.train import config_dataset

    if k < 1:
        raise WbsweepError(f"--fused K needs K >= 1, got {k}.")
    dev = pick_device(device)
    base = {"lr": 0.05, "wd": 5e-3} if dataset == "digits-lt" else {}
    cfgs = [bench_config(model, device, batch_size, width, {"compile": "off", **base, **(overrides or {}), "seed": s})
            for s in range(k)]  # the dataset key is the default, digits-lt: synthetic data is passed in
    check_fusable(cfgs)
    if dataset == "synthetic":
        data = synthetic_dataset(data_kind(model), images if images is not None else default_images(dev, model))
    else:
        data = config_dataset(cfgs[0])
    dd = DeviceData(data, dev, cfgs[0]["augment"])
    seq = []
    for cfg in cfgs:
        torch.manual_seed(cfg["seed"])
        seq.append(build_training(cfg, dd))
    runners = [r.runner() for r in seq]
    group = build_fused(cfgs, dd)
    log(f"bench fused: {k} x {model} (width {width}, batch {batch_size}) on {device_name(dev)}: "
        f"{len(data.y_train)} {dataset} images per epoch, 1 warm-up + {rounds} timed rounds")
    load_before = load_average()
    seq_t = fused_t = 0.0
    seq_n = fused_n = 0
    seq_rates, fused_rates = [], []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        n = 0
        for run, runner in zip(seq, runners, strict=True):
            loss_sum, seen = runner.epoch()
            run.sched.step()
            float(loss_sum)  # the one host synchronisation of an epoch, as in train()
            n += seen
        dt = time.perf_counter() - t0
        if r:
            seq_t, seq_n = seq_t + dt, seq_n + n
            seq_rates.append(n / dt)
        t0 = time.perf_counter()
        group.set_lr([float(run.opt.param_groups[0]["lr"]) for run in group.runs])
        loss_sum, seen = group.epoch()
        for run in group.runs:
            run.sched.step()
        loss_sum.tolist()
        dt = time.perf_counter() - t0
        if r:
            fused_t, fused_n = fused_t + dt, fused_n + k * seen
            fused_rates.append(k * seen / dt)
        log(f"  round {r}: sequential {seq_rates[-1]:.1f}, fused {fused_rates[-1]:.1f} img/s per model" if r
            else "  warm-up round done")
    seq_ips, fused_ips = seq_n / seq_t, fused_n / fused_t
    result = {
        "fused_k": k, "fused_img_per_s_per_model": round(fused_ips, 1),
        "sequential_img_per_s_per_model": round(seq_ips, 1), "fused_speedup": round(fused_ips / seq_ips, 2),
        "model": model, "width": width, "batch_size": batch_size, "dataset": dataset,
        "images_per_epoch": len(data.y_train), "rounds": rounds, "device": dev.type, "device_name": device_name(dev),
        "threads": torch.get_num_threads(), "sequential_round_img_per_s": [round(v, 1) for v in seq_rates],
        "fused_round_img_per_s": [round(v, 1) for v in fused_rates], "torch": torch.__version__,
        "load_average_before": load_before, "load_average_after": load_average(),
    }
    log(f"  {k} models one after the other: {seq_ips:10.1f} img/s per model")
    log(f"  {k} models fused:              {fused_ips:10.1f} img/s per model")
    log(f"  fused speedup: {fused_ips / seq_ips:.2f}x")
    return result
