"""How fast one model trains (``wbsweep bench`` sections, one process each).

* :func:`compare`: the naive trainer of trainables/reference.py against wbsweep's trainer, same
  model, init and data, alternating epochs after a warm-up round.
* :func:`knob_timing`: images per second of wbsweep's trainer for each combination of the speed knobs.
* :func:`full_run`: ``train()`` itself for a few epochs, extrapolated to the paper's 320 epochs.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch

from orchestrator.bench.setup import (
    SHAPES,
    Log,
    _setup,
    _sync,
    available_cores,
    bench_config,
    data_kind,
    default_images,
    device_name,
    load_average,
    synthetic_dataset,
)
from trainables.device_data import DeviceData
from trainables.models import ModelSpec, build_model
from trainables.reference import ReferenceTrainer
from trainables.runner import Knobs
from trainables.train import build_training, train

# --- naive vs wbsweep ------------------------------------------------------------------------------


def _knob_label(knobs: Knobs) -> str:
    return f"{knobs.precision}, channels_last {'on' if knobs.channels_last else 'off'}, compile {knobs.compile}"


def compare(device: str = "cpu", model: str = "resnet32", batch_size: int = 64, images: int | None = None,
            rounds: int = 3, threads: int | None = None, naive_workers: int = 0, fast_epochs: int | None = None,
            width: int | None = None, overrides: dict[str, Any] | None = None, log: Log = print) -> dict[str, Any]:
    """Images per second of the naive and the wbsweep trainer, alternating: a warm-up round (not
    timed: cuDNN autotuning, CUDA-graph capture, first allocations), then ``rounds`` timed rounds
    of one naive epoch and ``fast_epochs`` wbsweep epochs each. Training only (no validation)."""
    dev = _setup(device, threads)
    n = images if images is not None else default_images(dev, model)
    data = synthetic_dataset(data_kind(model), n)
    cfg = bench_config(model, device, batch_size, width, overrides)
    dd = DeviceData(data, dev)
    torch.manual_seed(0)
    fast = build_training(cfg, dd)
    knobs = fast.knobs
    runner = fast.runner()
    ref_model = build_model(ModelSpec(model, data.num_classes, data.x_train.shape[1], data.x_val.shape[-1],
                                      cfg["classifier"], cfg["etf_bias"], width, etf_seed=cfg["seed"])).to(dev)
    ref_model.load_state_dict(fast.model.state_dict())  # the same initial weights
    naive = ReferenceTrainer(cfg, data, ref_model, dev, num_workers=naive_workers)
    fast_epochs = fast_epochs or (5 if dev.type == "cuda" else 1)
    log(f"bench {model} (batch {batch_size}) on {device_name(dev)}: {len(data.y_train)} synthetic "
        f"{SHAPES[data_kind(model)]['title']} images per epoch, 1 warm-up + {rounds} timed rounds")
    load_before = load_average()
    naive_rates, fast_rates = [], []
    naive_t = fast_t = 0.0
    naive_n = fast_n = 0
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        _, seen = naive.epoch()
        _sync(dev)
        dt = time.perf_counter() - t0
        if r:
            naive_t, naive_n = naive_t + dt, naive_n + seen
            naive_rates.append(seen / dt)
        t0 = time.perf_counter()
        seen_total = 0
        for _ in range(fast_epochs):
            loss_sum, seen = runner.epoch()
            fast.sched.step()
            float(loss_sum)  # the one host synchronisation of an epoch, as in train()
            seen_total += seen
        dt = time.perf_counter() - t0
        if r:
            fast_t, fast_n = fast_t + dt, fast_n + seen_total
            fast_rates.append(seen_total / dt)
        log(f"  round {r}: naive {naive_rates[-1]:.1f} img/s, wbsweep {fast_rates[-1]:.1f} img/s" if r
            else "  warm-up round done")
    naive_ips, fast_ips = naive_n / naive_t, fast_n / fast_t
    result = {
        "device": dev.type, "model": model, "naive_img_per_s": round(naive_ips, 1),
        "wbsweep_img_per_s": round(fast_ips, 1), "speedup": round(fast_ips / naive_ips, 2),
        "device_name": device_name(dev), "batch_size": batch_size, "images_per_epoch": len(data.y_train),
        "rounds": rounds, "threads": torch.get_num_threads(), "naive_workers": naive_workers,
        "precision": knobs.precision, "channels_last": knobs.channels_last, "compile": knobs.compile,
        "equal_precision": knobs.precision == "fp32", "naive_round_img_per_s": [round(v, 1) for v in naive_rates],
        "wbsweep_round_img_per_s": [round(v, 1) for v in fast_rates], "torch": torch.__version__,
        "load_average_before": load_before, "load_average_after": load_average(),
    }
    log(f"  naive trainer   (DataLoader, per-sample transforms, fp32, .item() per step): {naive_ips:10.1f} img/s")
    log(f"  wbsweep trainer ({_knob_label(knobs)}): {fast_ips:10.1f} img/s")
    log(f"  speedup: {fast_ips / naive_ips:.2f}x" + ("" if knobs.precision == "fp32" else " (NOT at equal precision)"))
    if result["load_average_before"] is not None:
        log(f"  load average (1/5/15 min) before {result['load_average_before']}, after {result['load_average_after']}"
            f" on {available_cores()} cores: other work on the cores slows both trainers, unequally")
    return result


# --- throughput per knob setting -------------------------------------------------------------------


def knob_timing(device: str = "cpu", model: str = "resnet32", batch_size: int = 64, images: int | None = None,
                epochs: int | None = None, width: int | None = None, with_torch_compile: bool = False,
                log: Log = print) -> list[dict[str, Any]]:
    """Images per second of the wbsweep trainer for each combination of the speed knobs."""
    dev = _setup(device, None)
    n = images if images is not None else default_images(dev, model)
    data = synthetic_dataset(data_kind(model), n)
    dd = DeviceData(data, dev)
    epochs = epochs or (3 if dev.type == "cuda" else 1)
    combos = [(p, cl, c) for p in ("fp32", "bf16") for cl in (False, True)
              for c in (("off", "cudagraph") if dev.type == "cuda" else ("off",))]
    if dev.type == "cuda" and with_torch_compile:  # inductor's kernels in the graph (compiles for a minute)
        combos += [("fp32", True, "cudagraph+torch")]
    log(f"knob timing {model} (batch {batch_size}) on {device_name(dev)}, {len(data.y_train)} images per epoch:")
    rows = []
    for precision, cl, mode in combos:
        cfg = bench_config(model, device, batch_size, width,
                           {"precision": precision, "channels_last": cl, "compile": mode})
        torch.manual_seed(0)
        run = build_training(cfg, dd)
        runner = run.runner()
        float(runner.epoch()[0])  # warm-up (and capture)
        t0, seen_all = time.perf_counter(), 0
        for _ in range(epochs):
            loss_sum, seen = runner.epoch()
            float(loss_sum)
            seen_all += seen
        ips = seen_all / (time.perf_counter() - t0)
        rows.append({"precision": precision, "channels_last": cl, "compile": mode, "img_per_s": round(ips, 1)})
        log(f"  {precision}  channels_last {'on ' if cl else 'off'}  compile {mode:<15} {ips:10.1f} img/s")
    return rows


# --- a whole run, extrapolated to the paper's 320 epochs -----------------------------------------


def full_run(device: str = "cuda", model: str = "resnet32", epochs: int = 16, batch_size: int = 64,
             overrides: dict[str, Any] | None = None, images: int | None = None, log: Log = print) -> dict[str, Any]:
    """``train()`` on the full CIFAR100-LT-shaped set (10,457 training, 2,000 validation, 10,000 test
    images) for ``epochs`` epochs, each with its validation pass, then the final evaluation (FDR,
    three LA variants) and the artifacts. The 320-epoch time is estimated as: setup and first epoch
    + 319 x the median later epoch + final evaluation."""
    dev = _setup(device, None)
    data = synthetic_dataset(data_kind(model), images, test_images=10_000 if images is None else 500)
    cfg = bench_config(model, device, batch_size, None,
                       {"epochs": epochs, "la": ["none", "add", "mult"], **(overrides or {})})
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="wbsweep-bench-") as tmp:
        t0 = time.perf_counter()
        metrics = train(cfg, tmp, report=lambda m: stamps.append(time.perf_counter()), data=data)
        t_end = time.perf_counter()
    per_epoch = np.diff(stamps)
    steady = float(np.median(per_epoch)) if len(per_epoch) else stamps[0] - t0
    first, final = stamps[0] - t0, t_end - stamps[-1]
    estimate = first + 319 * steady + final
    result = {"model": model, "epochs_run": epochs, "images_per_epoch": len(data.y_train),
              "setup_and_first_epoch_s": round(first, 2), "epoch_s": round(steady, 4), "final_eval_s": round(final, 2),
              "estimate_320_epochs_s": round(estimate, 1), "measured_s": round(t_end - t0, 1),
              "train_img_per_s": round(len(data.y_train) / steady, 1), "best_epoch": metrics["best_epoch"]}
    log(f"full run {model} on {device_name(dev)}: train() for {epochs} epochs of {len(data.y_train)} images + "
        f"validation: setup+first epoch {first:.1f} s, then {steady * 1000:.0f} ms/epoch, final evaluation "
        f"{final:.1f} s -> 320 epochs ~ {estimate:.0f} s")
    return result
