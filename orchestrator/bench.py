"""``wbsweep bench``: how fast wbsweep trains, against a naive trainer, and what orchestration costs.

Every figure is measured on synthetic long-tailed data of the real shapes (nothing to download):
CIFAR100-LT-shaped (3x32x32, 100 classes, rho 100: 10,457 training and 2,000 validation images)
for convolutional models, MNIST-LT-shaped (1x28x28, 10 classes, rho 100) for MLPs. Random pixels
train at the same speed as real ones.

Sections (each returns a dict; the CLI prints them as text or one JSON object):

* :func:`compare`: the naive trainer of trainables/reference.py (DataLoader, per-sample
  torchvision transforms, fp32, ``.item()`` per step) and wbsweep's trainer (trainables/train.py's
  :class:`~trainables.train.EpochRunner`), same model, same init, same data, in one process,
  alternating epochs after a warm-up round: training images per second of each and the ratio.
* :func:`check_knobs`: a few epochs from the same init on the same batches with each speed knob
  (channels_last, bf16, CUDA graph, torch.compile) against eager fp32: weights and loss agree?
  On CUDA also counts host synchronisations inside an epoch of the CUDA-graph trainer.
* :func:`knob_timing`: images per second of the fast trainer for each knob combination.
* :func:`full_run`: ``train()`` itself (per-epoch validation, final evaluation, artifacts) for a
  few epochs on the full CIFAR100-LT-shaped set, extrapolated to the paper's 320 epochs.
* :func:`packed`: N worker processes training at once on one device (what Ray's fractional GPUs
  do) against one alone: aggregate images per second.
* :func:`orchestration_overhead`: N short trials through Ray Tune against the same trainable
  called directly. The only section that needs Ray (imported there, not here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.config import resolve_config
from trainables.data import LTDataset, lt_counts
from trainables.errors import WbsweepError
from trainables.models import BACKBONES, ModelSpec, build_model, check_model_name
from trainables.reference import ReferenceTrainer
from trainables.train import DeviceData, Knobs, build_training, pick_device, predict, train

Log = Callable[[str], None]

# --- synthetic data of the real shapes -------------------------------------------------------------

SHAPES: dict[str, dict[str, Any]] = {
    "cifar": {"title": "CIFAR100-LT-shaped", "classes": 100, "image": (3, 32, 32), "n_max": 480, "rho": 100.0,
              "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010), "augment": "crop_flip",
              "many": 100, "few": 20},
    "mnist": {"title": "MNIST-LT-shaped", "classes": 10, "image": (1, 28, 28), "n_max": 5980, "rho": 100.0,
              "mean": (0.1307,), "std": (0.3081,), "augment": "none", "many": 1000, "few": 200},
}


def data_kind(model: str) -> str:
    """cifar for the convolutional models, mnist for the MLPs."""
    return "mnist" if model.startswith(("mlp", "resblock")) else "cifar"


def synthetic_dataset(kind: str, train_images: int | None = None, val_per_class: int = 20,
                      test_images: int = 1000, seed: int = 0) -> LTDataset:
    """Random uint8 images with the long-tailed label profile of ``kind`` (SHAPES), labels in a
    random file order. ``train_images`` scales the profile down to about that many images (every
    class keeps at least one)."""
    s = SHAPES[kind]
    gen = torch.Generator().manual_seed(seed)
    c = s["classes"]
    counts = lt_counts(s["n_max"], c, s["rho"])
    if train_images is not None and train_images < sum(counts):
        scale = train_images / sum(counts)
        counts = [max(1, round(n * scale)) for n in counts]
    y = torch.repeat_interleave(torch.arange(c), torch.tensor(counts))
    y = y[torch.randperm(len(y), generator=gen)]

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, *s["image"]), dtype=torch.uint8, generator=gen)

    y_val = torch.arange(c).repeat_interleave(val_per_class)
    y_test = torch.arange(test_images) % c
    return LTDataset(
        name=f"synthetic-{kind}-lt", x_train=images(len(y)), y_train=y, x_val=images(len(y_val)), y_val=y_val,
        x_test=images(test_images), y_test=y_test, num_classes=c, class_counts=counts, mean=s["mean"],
        std=s["std"], augment=s["augment"], many_threshold=s["many"], few_threshold=s["few"],
    )


def default_images(device: torch.device, model: str) -> int | None:
    """Training images per epoch: the whole synthetic set on a GPU; on a CPU a subset that keeps an
    epoch to a few seconds (all that matters is images per second)."""
    if device.type == "cuda":
        return None
    if model == "resnet32":
        return 640
    return 4096 if data_kind(model) == "mnist" else 256


def bench_config(model: str, device: str, batch_size: int = 64, width: int | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training config both trainers use: the paper's optimisation (SGD momentum 0.9, lr 0.01,
    cosine over 320 epochs, batch 64) with weight decay 5e-3 and CE (the WD method)."""
    check_model_name(model)
    base = {"model": model, "width": width, "batch_size": batch_size, "epochs": 320, "lr": 0.01, "momentum": 0.9,
            "wd": 5e-3, "loss": "ce", "device": device, "la": ["none"], "seed": 0, "checkpoint_seconds": 1e9}
    return resolve_config({**base, **(overrides or {})})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or ``taskset``'s share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages: other work on the cores moves CPU figures."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _knob_label(knobs: Knobs) -> str:
    return f"{knobs.precision}, channels_last {'on' if knobs.channels_last else 'off'}, compile {knobs.compile}"


def _setup(device: str, threads: int | None) -> torch.device:
    dev = pick_device(device)
    if threads:
        torch.set_num_threads(int(threads))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both trainers: fixed shapes
    return dev


# --- naive vs wbsweep ------------------------------------------------------------------------------


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


# --- fused training: K models as one -----------------------------------------------------------------


def fused(device: str = "cpu", model: str = "mlp3", k: int = 5, batch_size: int = 64, width: int | None = 128,
          rounds: int = 3, dataset: str = "digits-lt", images: int | None = None,
          overrides: dict[str, Any] | None = None, log: Log = print) -> dict[str, Any]:
    """K models (seeds 0..K-1) trained fused (trainables/fused.py) against the same K trained one after
    the other with train()'s :class:`~trainables.train.EpochRunner`, in one process, alternating: a
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


# --- do the knobs keep the numbers? ----------------------------------------------------------------


def _train_variant(data: LTDataset, dev: torch.device, model: str, batch_size: int, epochs: int,
                   knob_cfg: dict[str, Any], width: int | None, perturb: float = 0.0,
                   ) -> tuple[torch.Tensor, list[float]]:
    """Train ``epochs`` epochs from the seed-0 initialisation (its weights times 1 +- ``perturb``
    when asked) on the seed-0 batches; return the flat weights and each epoch's mean loss."""
    cfg = bench_config(model, dev.type, batch_size, width, {"epochs": max(epochs, 2), **knob_cfg})
    torch.manual_seed(0)
    run = build_training(cfg, DeviceData(data, dev))
    if perturb:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in run.model.parameters():
                sign = torch.randint(0, 2, p.shape, generator=gen).to(p.device, p.dtype) * 2 - 1
                p.mul_(1 + perturb * sign)
    runner = run.runner()
    losses = []
    for _ in range(epochs):
        loss_sum, seen = runner.epoch()
        run.sched.step()
        losses.append(float(loss_sum) / seen)
    return _flat({k: p.detach() for k, p in run.model.named_parameters()}), losses


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.detach().double().cpu().reshape(-1) for w in weights.values()])


def _grads(data: LTDataset, dev: torch.device, model: str, batch_size: int, width: int | None,
           knob_cfg: dict[str, Any], float64: bool = False) -> tuple[torch.Tensor, float]:
    """Gradient (flat, float64 on the CPU) and loss of the first training batch at the seed-0
    initialisation, computed as the trainer computes it with these knobs; ``float64``: the same in
    float64 throughout (the reference)."""
    import copy

    cfg = bench_config(model, dev.type, batch_size, width, {"epochs": 2, **knob_cfg})
    torch.manual_seed(0)
    dd = DeviceData(data, dev)
    run = build_training(cfg, dd)
    runner = run.runner()
    x_u8, y = dd.x["train"][:batch_size], dd.y["train"][:batch_size]
    x = dd.prepare(x_u8, False, None, runner.channels_last)
    net = run.model
    if float64:
        net = copy.deepcopy(net).double()
        net.train()
        feats = net.backbone(x.double())
        logits = net.classifier(feats)
        loss = run.loss_fn(feats, logits, y, net)
    else:
        net.train()
        loss, _ = (runner._compiled or runner._forward_loss)(x, y)
    loss.backward()
    return torch.cat([p.grad.detach().double().cpu().reshape(-1) for p in net.parameters()]), float(loss.detach())


def _label(knob_cfg: dict[str, Any]) -> str:
    parts = [knob_cfg.get("precision", "fp32")]
    if knob_cfg.get("channels_last"):
        parts.append("channels_last")
    if knob_cfg.get("compile", "off") != "off":
        parts.append(f"compile={knob_cfg['compile']}")
    return " + ".join(parts)


def check_knobs(device: str = "cpu", model: str = "resnet32", batch_size: int = 64, steps: int = 5,
                epochs: int = 2, width: int | None = None, with_torch_compile: bool = False,
                log: Log = print) -> dict[str, Any]:
    """Do the speed knobs keep the numbers? TF32 off and cuDNN deterministic during the check, so
    fp32 means fp32. Data: ``steps`` full batches and a partial one per epoch.

    A. Gradient of one batch at the initialisation, against the same computation in float64:
       fp32 knob settings (channels_last, torch.compile) must be about as accurate as plain fp32
       (error at most 10 x eager fp32's, or 1e-2: the level of the TF32 convolutions that PyTorch
       uses for fp32 on NVIDIA GPUs by default; a deep net at initialisation is ill-conditioned,
       and PyTorch's channels-last BatchNorm on CPUs rounds more than its NCHW one); bf16 must point
       the same way (cosine > 0.95).
    B. (CUDA) The CUDA-graph trainer against the eager one with the same knobs, ``epochs`` epochs on
       the same batches (warm-up steps, capture, replays, the eager partial batch, the learning rate
       of the next epoch): weights at most as far apart as a one-ulp change of the initial weights
       moves eager training (bit-identical is expected).
    C. Mean training loss of the last epoch with each setting against eager fp32: within 2e-3
       (fp32 settings) or 2e-2 (bf16).
    D. (CUDA) Host synchronisations inside one epoch of the default trainer: 0 expected."""
    dev = _setup(device, None)
    data = synthetic_dataset(data_kind(model), steps * batch_size + 17, seed=1)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cuda = dev.type == "cuda"
    base = {"channels_last": False, "precision": "fp32", "compile": "off"}
    settings = [{**base, "channels_last": True}, {**base, "precision": "bf16"},
                {**base, "precision": "bf16", "channels_last": True}]
    if with_torch_compile:
        settings.append({**base, "compile": "torch"})
    result: dict[str, Any] = {"gradient": [], "cuda_graph": [], "loss": []}
    oks: list[bool] = []

    def attempt(rows: list, label: str, fn: Callable[[], dict[str, Any]]) -> None:
        try:
            row = {"knobs": label, **fn()}
        except Exception as exc:  # one broken path must not hide the others
            row = {"knobs": label, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            log(f"    {label:<34} FAILED: {row['error'][:300]}")
        rows.append(row)
        oks.append(row["ok"])

    try:
        log(f"knob check {model} on {device_name(dev)} (TF32 off, deterministic cuDNN; {epochs} epochs of "
            f"{steps} batches of {batch_size} + 1 of 17):")
        g64, _ = _grads(data, dev, model, batch_size, width, base, float64=True)
        g32, _ = _grads(data, dev, model, batch_size, width, base)
        e32 = float((g32 - g64).norm() / g64.norm())
        log(f"  A. gradient of one batch vs float64 (eager fp32: relative error {e32:.1e})")
        result["fp32_gradient_error"] = e32

        def grad_row(knob: dict[str, Any]) -> dict[str, Any]:
            g, _ = _grads(data, dev, model, batch_size, width, knob)
            err = float((g - g64).norm() / g64.norm())
            cos = float(g @ g64 / (g.norm() * g64.norm()))
            ok = cos > 0.95 if knob["precision"] == "bf16" else err <= max(10 * e32, 1e-2)
            rule = "cosine > 0.95" if knob["precision"] == "bf16" else "error <= max(10x fp32's, 1e-2)"
            log(f"    {_label(knob):<34} error {err:.1e}  cosine {cos:.6f}  {'PASS' if ok else 'FAIL'} ({rule})")
            return {"error": err, "cosine": cos, "ok": ok}

        for knob in settings:
            attempt(result["gradient"], _label(knob), lambda knob=knob: grad_row(knob))

        init = _flat({k: p for k, p in _init_weights(data, dev, model, width).items()})
        ref_w, ref_loss = _train_variant(data, dev, model, batch_size, epochs, base, width)
        if cuda:
            lr = {"lr": 1e-3}  # a gentler step keeps the one-ulp yardstick small
            ulp_w, _ = _train_variant(data, dev, model, batch_size, epochs, {**base, **lr}, width, perturb=2**-23)
            eager_w, _ = _train_variant(data, dev, model, batch_size, epochs, {**base, **lr}, width)
            floor = float((ulp_w - eager_w).norm() / (eager_w - init).norm())
            log(f"  B. CUDA graph vs eager, same knobs and batches (a 1-ulp change of the initial weights moves "
                f"the weights by {floor:.1e})")
            result["ulp_yardstick"] = floor

            def graph_row(knob: dict[str, Any]) -> dict[str, Any]:
                w_e, l_e = _train_variant(data, dev, model, batch_size, epochs, {**knob, **lr}, width)
                w_g, l_g = _train_variant(data, dev, model, batch_size, epochs,
                                          {**knob, **lr, "compile": "cudagraph"}, width)
                diff = float((w_g - w_e).norm() / (w_e - init).norm())
                ok = diff <= max(floor, 1e-9)
                same = "bit-identical" if diff == 0 else f"{diff:.1e}"
                log(f"    {_label(knob):<34} {same:<14} losses {l_g[-1]:.6f} / {l_e[-1]:.6f}  "
                    f"{'PASS' if ok else 'FAIL'}")
                return {"weight_diff": diff, "loss_graph": l_g[-1], "loss_eager": l_e[-1], "ok": ok}

            for knob in (base, {**base, "channels_last": True}, {**base, "precision": "bf16", "channels_last": True}):
                attempt(result["cuda_graph"], _label(knob), lambda knob=knob: graph_row(knob))
        log(f"  C. mean training loss of epoch {epochs} vs eager fp32 ({ref_loss[-1]:.6f})")

        def loss_row(knob: dict[str, Any]) -> dict[str, Any]:
            _, loss = _train_variant(data, dev, model, batch_size, epochs, knob, width)
            d = abs(loss[-1] - ref_loss[-1]) / abs(ref_loss[-1])
            tol = 2e-2 if knob["precision"] == "bf16" else 2e-3
            ok = d < tol
            log(f"    {_label(knob):<34} {loss[-1]:.6f}  relative difference {d:.1e}  {'PASS' if ok else 'FAIL'}")
            return {"loss": loss[-1], "relative_diff": d, "ok": ok}

        loss_settings = list(settings)
        if cuda:
            loss_settings.append({**base, "precision": "bf16", "channels_last": True, "compile": "cudagraph"})
        for knob in loss_settings:
            attempt(result["loss"], _label(knob), lambda knob=knob: loss_row(knob))
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved
    if cuda:
        result["host_syncs_in_epoch"] = count_host_syncs(data, dev, model, batch_size, width, log)
        oks.append(result["host_syncs_in_epoch"] == 0)
    result["ok"] = all(oks)
    log(f"  knob check: {'PASS' if result['ok'] else 'FAIL'}")
    return result


def _init_weights(data: LTDataset, dev: torch.device, model: str, width: int | None) -> dict[str, torch.Tensor]:
    cfg = bench_config(model, dev.type, 64, width)
    torch.manual_seed(0)
    spec = ModelSpec(model, data.num_classes, data.x_train.shape[1], data.x_val.shape[-1], cfg["classifier"],
                     cfg["etf_bias"], width, etf_seed=cfg["seed"])
    return {k: p.detach() for k, p in build_model(spec).named_parameters()}


def is_sync_warning(message: str) -> bool:
    """Whether a warning of torch's sync-debug mode reports a synchronising call ("called a
    synchronizing CUDA operation"), not the one saying the mode is a prototype, which this
    project's first GPU figures counted as a synchronisation by mistake."""
    return "synchronizing cuda operation" in message.lower()


def count_host_syncs(data: LTDataset, dev: torch.device, model: str, batch_size: int, width: int | None,
                     log: Log = print) -> int:
    """Synchronising CUDA calls during one epoch of the default (CUDA-graph) trainer after its
    warm-up, as torch.cuda.set_sync_debug_mode reports them."""
    cfg = bench_config(model, dev.type, batch_size, width)
    torch.manual_seed(0)
    run = build_training(cfg, DeviceData(data, dev))
    knobs = run.knobs
    runner = run.runner()
    runner.epoch()
    run.sched.step()
    _sync(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss_sum, _ = runner.epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    float(loss_sum)
    syncs = [str(w.message).splitlines()[0] for w in caught if is_sync_warning(str(w.message))]
    log(f"  D. host synchronisations inside one epoch (compile={knobs.compile}): {len(syncs)}"
        + (f" - first: {syncs[0][:120]}" if syncs else ""))
    return len(syncs)


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


# --- several trials on one device --------------------------------------------------------------------


def _trial_epoch(run: Any, runner: Any, dd: DeviceData, knobs: Knobs) -> int:
    """One epoch as train() runs it: training, schedule step, validation predictions, one sync."""
    loss_sum, seen = runner.epoch()
    run.sched.step()
    pred = predict(run.model, dd, "val", run.cfg["eval_batch_size"], knobs)
    float(loss_sum)
    pred.cpu()
    return seen


def worker(spec: dict[str, Any]) -> None:
    """One packed trial (a separate process): set up and warm up, print "ready", wait for a line on
    stdin, train epochs (with validation) for ``seconds``, print {"images", "seconds"} as JSON."""
    dev = _setup(spec["device"], spec["threads"])
    data = synthetic_dataset(data_kind(spec["model"]), spec["images"], seed=spec["seed"])
    cfg = bench_config(spec["model"], spec["device"], spec["batch_size"], spec["width"], spec["overrides"])
    dd = DeviceData(data, dev)
    torch.manual_seed(spec["seed"])
    run = build_training(cfg, dd)
    knobs = run.knobs
    runner = run.runner()
    _trial_epoch(run, runner, dd, knobs)
    print("ready", flush=True)
    sys.stdin.readline()
    t0, images, epochs = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < spec["seconds"] or epochs == 0:
        images += _trial_epoch(run, runner, dd, knobs)
        epochs += 1
    print(json.dumps({"images": images, "seconds": time.perf_counter() - t0, "epochs": epochs}), flush=True)


def _run_workers(k: int, spec: dict[str, Any], timeout: float = 300.0) -> list[dict[str, Any]]:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore"}
    procs = []
    for i in range(k):
        cmd = [sys.executable, "-m", "orchestrator.bench", "--worker", json.dumps({**spec, "seed": i})]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=root))
    errors: list[str] = [""] * k

    def drain(i: int, p: subprocess.Popen) -> None:  # keep stderr from filling its pipe
        errors[i] = p.stderr.read()

    drains = [threading.Thread(target=drain, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in drains:
        t.start()
    try:
        deadline = time.time() + timeout
        for i, p in enumerate(procs):
            line = p.stdout.readline().strip()
            if line != "ready" or time.time() > deadline:
                p.wait(timeout=30)
                raise WbsweepError(f"packed worker {i} did not start: {line or ''} {errors[i][-800:]}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for i, p in enumerate(procs):
            line = p.stdout.readline().strip()
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                p.wait(timeout=30)
                raise WbsweepError(f"packed worker {i} failed: {line} {errors[i][-800:]}") from None
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def packed(device: str = "cuda", model: str = "resnet32", trials: int = 4, seconds: float = 15.0,
           batch_size: int = 64, images: int | None = None, width: int | None = None,
           overrides: dict[str, Any] | None = None, log: Log = print) -> dict[str, Any]:
    """Aggregate training throughput of ``trials`` processes training at once on one device (each an
    epoch loop with validation, like a trial) against one process alone. CPU threads per process:
    the cores divided among the trials (as cpus_per_trial does under Ray)."""
    dev = pick_device(device)
    cores = available_cores()
    n = images if images is not None else default_images(dev, model)
    base = {"device": device, "model": model, "batch_size": batch_size, "width": width, "images": n,
            "overrides": overrides or {}, "seconds": seconds}
    out: dict[str, Any] = {"packed_trials": trials, "seconds": seconds}
    for k in (1, trials):
        res = _run_workers(k, {**base, "threads": max(1, cores // k)})
        rates = [r["images"] / r["seconds"] for r in res]
        out[f"img_per_s_{k}"] = round(sum(rates), 1)
        out[f"per_trial_img_per_s_{k}"] = [round(v, 1) for v in rates]
        log(f"  {k} trial(s) at once ({max(1, cores // k)} CPU threads each): {sum(rates):10.1f} img/s in all"
            + (f" ({', '.join(f'{v:.0f}' for v in rates)})" if k > 1 else ""))
    out["single_img_per_s"] = out.pop("img_per_s_1")
    out["packed_img_per_s"] = out.pop(f"img_per_s_{trials}")
    out["packed_speedup"] = round(out["packed_img_per_s"] / out["single_img_per_s"], 2)
    log(f"  {trials} packed trials: {out['packed_speedup']:.2f}x the throughput of one")
    return out


# --- orchestration overhead ---------------------------------------------------------------------


def timed_trainable(config: dict[str, Any]) -> None:
    """trainables.trial.tune_trainable, noting when the trial's own code started and ended (in the
    folder ``_times``), so the benchmark can tell a worker's one-off start from per-trial costs."""
    from trainables.trial import tune_trainable

    started = time.time()
    tune_trainable(config)
    Path(config["_times"], f"{config['seed']}.json").write_text(json.dumps([started, time.time()]))


def orchestration_overhead(trials: int = 4, epochs: int = 320, cpus_per_trial: int = 1,
                           log: Log = print) -> dict[str, Any]:
    """The same ``trials`` trials (digits-lt, MLP3 of width 128: the cpu preset's model, for
    ``epochs`` epochs, 320 by default: as many per-epoch reports as a paper run) run by calling the
    training function directly, one after another, and through Ray Tune (the sweep's trainable,
    one trial at a time, ``cpus_per_trial`` CPUs each, actors reused as the sweep does).

    Three costs are told apart: starting Ray (once per sweep), starting a trial worker process
    (once per worker: imports, first allocations; the time from ``fit()`` to the first trial's
    code) and the overhead per trial (scheduling, per-epoch reports, result handling: the rest of
    Ray Tune's time beyond the direct calls). The last, as a share of a one-minute trial, is what
    orchestration costs a sweep of such trials."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise WbsweepError("--overhead needs Ray: pip install 'ray[tune]'.") from None

    cfg = {"dataset": "digits-lt", "model": "mlp3", "width": 128, "epochs": epochs, "device": "cpu",
           "threads": cpus_per_trial, "la": ["none", "add", "mult"], "lr": 0.05, "wd": 5e-3}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="wbsweep-overhead-") as tmp:
        train({**cfg, "epochs": 1}, Path(tmp) / "warmup")  # imports and first allocations, not timed
        t0 = time.perf_counter()
        for seed in range(trials):
            train({**cfg, "seed": seed}, Path(tmp) / "direct" / str(seed))
        direct = time.perf_counter() - t0
        torch.set_num_threads(threads)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        t0 = time.perf_counter()
        ray.init(num_cpus=max(cpus_per_trial, 1), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, configure_logging=True)
        ray_start = time.perf_counter() - t0
        times = Path(tmp) / "times"
        times.mkdir()
        try:
            tuner = tune.Tuner(
                tune.with_resources(timed_trainable, {"cpu": cpus_per_trial}),
                param_space={**cfg, "seed": tune.grid_search(list(range(trials))), "_runs": str(Path(tmp) / "runs"),
                             "_times": str(times)},
                tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
                run_config=tune.RunConfig(name="overhead", storage_path=str(Path(tmp) / "ray"), verbose=0),
            )
            fit_start = time.time()
            grid = tuner.fit()
            fit_end = time.time()
            failed = [r.error for r in grid if r.error]
        finally:
            ray.shutdown()
        spans = [json.loads(f.read_text()) for f in times.glob("*.json")]
    if failed or len(spans) != trials:
        raise WbsweepError(f"a Ray Tune trial failed: {failed[0] if failed else 'no timing'}")
    first = min(start for start, _ in spans)
    worker_start = first - fit_start
    through_ray = fit_end - first
    per_trial = (through_ray - direct) / trials
    mean_trial = direct / trials
    result = {"trials": trials, "epochs": epochs, "trial_s": round(mean_trial, 2), "direct_s": round(direct, 2),
              "ray_tune_s": round(through_ray, 2), "ray_start_s": round(ray_start, 2),
              "worker_start_s": round(worker_start, 2), "overhead_per_trial_s": round(per_trial, 2),
              "overhead_pct": round(100 * per_trial / mean_trial, 1),
              "overhead_pct_for_60s_trials": round(100 * max(per_trial, 0.0) / 60.0, 2)}
    log(f"orchestration overhead: {trials} trials of {epochs} epochs (~{mean_trial:.1f} s each): direct "
        f"{direct:.1f} s, through Ray Tune {through_ray:.1f} s after a one-off {ray_start:.1f} s to start Ray and "
        f"{worker_start:.1f} s to start the trial worker -> {per_trial:+.2f} s per trial "
        f"({result['overhead_pct']:+.1f} % of these trials; {result['overhead_pct_for_60s_trials']:.1f} % of a "
        f"one-minute trial)")
    return result


# --- the command --------------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """``wbsweep bench``: the sections the flags ask for; text on stdout, or with --json one JSON
    object on stdout (the text then goes to stderr)."""
    check_model_name(args.model)
    if args.model not in BACKBONES:
        raise WbsweepError(f"unknown model {args.model!r}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise WbsweepError("--device cuda: torch sees no GPU here; use --device cpu.")
    # On a CPU both trainers get every core this process may use (the targets are for the whole
    # machine; a naive trainer is no faster with DataLoader workers on 2 cores, measured). --threads 1
    # gives the per-core figure, how the cpu preset runs its trials (cpus_per_trial 1).
    threads = args.threads or (available_cores() if args.device == "cpu" else None)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_sections(args, overrides, threads)
    finally:  # the caller's setting (the CLI exits; a test or notebook goes on)
        torch.set_num_threads(threads_before)


def _run_sections(args: argparse.Namespace, overrides: dict[str, Any], threads: int | None) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    result: dict[str, Any] = {}
    failures: list[str] = []

    def save() -> None:  # after every section, so a run cut short keeps what it measured
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2, default=_json_default))

    def section(name: str, fn: Callable[[], Any]) -> None:
        try:
            result[name] = fn()
        except WbsweepError:
            raise
        except Exception as exc:  # a broken section is reported; the others still run
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        save()

    width = args.width
    if not args.skip_compare:
        try:
            result.update(compare(args.device, args.model, args.batch_size, args.images, args.rounds, threads,
                                  args.naive_workers, args.fast_epochs, width, overrides, log))
        except WbsweepError:
            raise
        except Exception as exc:
            failures.append(f"compare: {type(exc).__name__}: {exc}")
            log(f"compare FAILED: {type(exc).__name__}: {exc}")
            result.update({"device": args.device, "model": args.model, "error": str(exc)})
    else:
        result.update({"device": args.device, "model": args.model})
    save()
    if args.check_knobs:
        section("knob_check", lambda: check_knobs(args.device, args.model, args.batch_size, width=width,
                                                  with_torch_compile=args.with_torch_compile, log=log))
    if args.knob_timing:
        section("knob_timing", lambda: knob_timing(args.device, args.model, args.batch_size, args.images, width=width,
                                                   with_torch_compile=args.with_torch_compile, log=log))
    if args.full_run:
        for m in (args.full_run_models or args.model).split(","):
            section(f"full_run_{m}", lambda m=m: full_run(args.device, m, args.full_run, args.batch_size, overrides,
                                                          args.images, log=log))
    if args.packed:
        log(f"packed trials: {args.model}, {args.packed} processes on one {args.device} device vs one alone, "
            f"{args.packed_seconds:g} s each")
        for mode in args.packed_compile.split(","):
            section(f"packed_{mode}", lambda mode=mode: packed(
                args.device, args.model, args.packed, args.packed_seconds, args.batch_size, args.images, width,
                {**overrides, "compile": mode}, log=log))
    if args.fused:
        section("fused", lambda: fused(args.device, args.model, args.fused, args.batch_size, width, args.rounds,
                                       args.fused_dataset, args.images, overrides, log=log))
    if args.overhead:
        section("orchestration", lambda: orchestration_overhead(args.overhead_trials, args.overhead_epochs, log=log))
    if failures:
        result["failures"] = failures
    save()
    if args.json:
        print(json.dumps(result, default=_json_default))
    return 1 if failures else 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.bench --worker JSON`` runs one packed trial (see :func:`worker`);
    the benchmark itself is ``wbsweep bench`` (this module does not import the CLI: cli imports it)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":
        worker(json.loads(argv[1]))
        return 0
    print("usage: python -m orchestrator.bench --worker JSON (a packed trial); the benchmark is `wbsweep bench`",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
