"""Train and measure one model, top to bottom.

``train(cfg, out_dir)`` is the whole experiment for one (config, seed): load the long-tailed data
onto the device, build the model, train with SGD + cosine schedule keeping the best validation
epoch, then measure FDR and per-class accuracy with every post-hoc LA variant (its tau/gamma chosen
on validation logits). It writes what produced the result next to the result:
``config.json``, ``model.pt``, ``logits.npz`` and ``metrics.json`` in ``out_dir``.

Here: building a run (:func:`build_training`), the loop (:func:`train`) and its end
(:func:`finish_run`). The pieces it is made of:

* trainables/device_data.py: the data on the device (:class:`~trainables.device_data.DeviceData`,
  batched crop + flip and normalisation);
* trainables/runner.py: one epoch, fast (the speed knobs :class:`~trainables.runner.Knobs`, the fused
  SGD, :class:`~trainables.runner.EpochRunner`);
* trainables/evaluation.py: validation predictions and the final measurement
  (:func:`~trainables.evaluation.evaluate`);
* trainables/run_files.py: the run folder (checkpoints and resuming, the result files).

The benchmark (orchestrator/bench/command.py) trains with the same :func:`build_training` and
:class:`~trainables.runner.EpochRunner` that :func:`train` uses, against the naive trainer of
trainables/reference.py.
"""

from __future__ import annotations

import math
import platform
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import config_hash, resolve_config
from trainables.data import LTDataset, data_fingerprint
from trainables.datacache import cached_dataset
from trainables.device_data import DeviceData
from trainables.errors import WbsweepError
from trainables.evaluation import balanced_acc, evaluate, predict
from trainables.heads import maxnorm_threshold
from trainables.losses import cb_weights, class_balanced_loss, dot_regression_loss
from trainables.models import ModelSpec, Network, build_model, fix_batchnorm_, weight_decay_groups
from trainables.run_files import inject_crash, load_model_file, resume, retrain_hint, save_checkpoint, save_run
from trainables.runner import EpochRunner, Knobs, has_conv, make_sgd

Reporter = Callable[[dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial stops with this reason instead of writing NaN rows."""


# --- building a run -----------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WbsweepError("device 'cuda' was asked for but torch sees no GPU; use --device cpu.")
    return torch.device(name)


def make_loss(cfg: dict[str, Any], kind: str, counts: list[int], device: torch.device):
    """loss(features, logits, targets, model) for the configured kind."""
    if kind == "ce":
        return lambda f, z, y, m: F.cross_entropy(z, y)
    if kind == "cb":
        w = cb_weights(counts, cfg["cb_beta"]).to(device)
        return lambda f, z, y, m: class_balanced_loss(z, y, w, cfg["cb_form"])
    if kind == "dr":
        return lambda f, z, y, m: dot_regression_loss(f, m.classifier.weight, y)
    raise WbsweepError(f"unknown loss '{kind}'.")


@dataclass
class Training:
    """What one run trains with: built by :func:`build_training`, shared by train() and the benchmark."""

    cfg: dict[str, Any]
    dd: DeviceData
    knobs: Knobs
    model: Network
    opt: torch.optim.SGD
    sched: torch.optim.lr_scheduler.CosineAnnealingLR
    gen: torch.Generator
    loss_fn: Callable
    epochs: int
    stage2: bool
    threshold: float | None

    def runner(self, forgetting: dict[str, torch.Tensor] | None = None) -> EpochRunner:
        cfg = self.cfg
        return EpochRunner(
            self.model, self.dd, self.opt, self.loss_fn, batch_size=cfg["batch_size"], knobs=self.knobs,
            generator=self.gen, fr=0.0 if self.stage2 else cfg["fr"], threshold=self.threshold,
            maxnorm=cfg["maxnorm"] if self.stage2 else "none", frozen_backbone=self.stage2, forgetting=forgetting,
        )


def build_training(cfg: dict[str, Any], dd: DeviceData, knobs: Knobs | None = None) -> Training:
    """Model (initialised from the global torch RNG: seed it first), optimizer, schedule and data RNG
    of a resolved config; for WB's stage 2 the stage-1 model with only its classifier trainable.
    ``knobs`` None: the config's, resolved for this device, model and run length."""
    data, device = dd.data, dd.device
    model = build_model(
        ModelSpec(
            cfg["model"], data.num_classes, data.x_train.shape[1], data.x_val.shape[-1], cfg["classifier"],
            cfg["etf_bias"], cfg["width"], etf_seed=cfg["seed"],
        )
    ).to(device)
    if cfg["channels_last"] and has_conv(model):
        model = model.to(memory_format=torch.channels_last)

    stage2 = bool(cfg["stage2"])
    if stage2:
        # WB stage 2: start from the stage-1 model of the same seed, train only the classifier.
        init = Path(cfg["init_from"])
        state = load_model_file(init, f"this stage-2 run starts from that stage-1 model: "
                                      f"{retrain_hint(init.parent)}", map_location=device)
        model.load_state_dict(state["model"])
        model.backbone.requires_grad_(False)
        if cfg["stage2_init_norm"]:  # "WD&Norm&CB" (figure 6): unit-norm classifier rows instead of MaxNorm
            model.classifier.weight.data /= model.classifier.weight.data.norm(dim=1, keepdim=True).clamp_min(1e-12)
        threshold = maxnorm_threshold(model.classifier.weight.detach(), cfg["maxnorm_alpha"])
        epochs, wd, loss_kind = cfg["stage2_epochs"], cfg["stage2_wd"], cfg["stage2_loss"]
        groups = [{"params": [p for p in model.classifier.parameters() if p.requires_grad], "weight_decay": wd}]
    else:
        if cfg["bn"] == "fixed":
            fix_batchnorm_(model, cfg["bn_scale"])
        epochs, wd, loss_kind = cfg["epochs"], cfg["wd"], cfg["loss"]
        groups = weight_decay_groups(model, wd, cfg["wd_scope"], cfg["conv_only_linear"])
        threshold = None
    if loss_kind == "dr" and cfg["classifier"] != "etf":
        raise WbsweepError("the DR loss needs the fixed ETF classifier (classifier: etf).")

    if knobs is None:
        steps = epochs * math.ceil(len(data.y_train) / cfg["batch_size"])
        knobs = Knobs.resolve(cfg, device, conv=has_conv(model), steps=steps)
    loss_fn = make_loss(cfg, loss_kind, data.class_counts, device)
    opt = make_sgd(groups, cfg["lr"], cfg["momentum"], device)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    return Training(cfg, dd, knobs, model, opt, sched, gen, loss_fn, epochs, stage2, threshold)


# --- the run ---------------------------------------------------------------------------------


def config_dataset(cfg: dict[str, Any]) -> LTDataset:
    """The dataset a resolved config trains on (prepared once per node), checked against the
    config's ``data_fingerprint`` when it has one: a node whose files differ from the driver's
    (another copy of the dataset, a stale mount) fails the trial with the reason instead of
    training on other data. Raises WbsweepError."""
    data = cached_dataset(cfg["dataset"], cfg["data_root"], cfg["rho"], val_per_class=cfg["val_per_class"],
                          split=cfg["split"])
    want = cfg["data_fingerprint"]
    if want and data_fingerprint(data) != want:
        raise WbsweepError(f"{cfg['dataset']} on this node ({socket.gethostname()}, data root "
                           f"{cfg['data_root'] or 'default'}) has fingerprint {data_fingerprint(data)}, but the sweep "
                           f"was planned on data with fingerprint {want}: give every node the same files.")
    return data


def lr_at_epoch_start(sched: torch.optim.lr_scheduler.LRScheduler, timing: str) -> float:
    """Step the schedule where ``timing`` says and return the learning rate the coming epoch uses.

    ``epoch_start`` is the authors' ``utils/trainval.py``: ``CosineAnnealingLR(T_max=epochs)`` is
    stepped before each epoch, so epoch 1 already runs at lr(1) and the last epoch at lr(T) = 0.
    ``epoch_end`` steps after the epoch (PyTorch's documented order): epoch 1 at the base lr, the
    last at lr(T - 1). A resumed run's schedule state holds the steps taken, so both resume exactly."""
    if timing == "epoch_start":
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
            warnings.simplefilter("ignore", UserWarning)
            sched.step()
    return sched.get_last_lr()[0]


def train(cfg_in: dict[str, Any], out_dir: str | Path, report: Reporter | None = None,
          data: LTDataset | None = None, on_checkpoint: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train one model as ``cfg_in`` says, write its artifacts to ``out_dir`` and return its metrics.

    ``report`` is called once per epoch with ``epoch``, ``train_loss``, ``val_acc`` and ``lr``
    (Ray Tune's reporter when run as a trial). Raises :class:`TrainingDiverged` on a NaN loss.
    ``data`` replaces the configured dataset (the benchmark trains on synthetic data this way).
    ``on_checkpoint`` is called after each checkpoint is written (a trial copies it to the storage).
    """
    cfg = resolve_config(cfg_in)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()  # durations: a step of the wall clock changes none of them
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    device = pick_device(cfg["device"])
    Knobs.resolve(cfg, device)  # a knob this device cannot do fails before the data is read
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once

    if data is None:
        data = config_dataset(cfg)
    dd = DeviceData(data, device, cfg["augment"])
    c = data.num_classes
    run = build_training(cfg, dd)
    model, opt, sched, gen, epochs, stage2 = run.model, run.opt, run.sched, run.gen, run.epochs, run.stage2
    knobs = run.knobs

    # Resume from this run's own checkpoint when a crashed or preempted trial is retried.
    progress = resume(out, cfg, model, opt, sched, gen)
    n = len(dd.x["train"])
    track = cfg["track_forgetting"] and not stage2
    if track and "forgetting" not in progress:
        # Toneva et al.'s forgetting events, per training image, kept on the device (figure 4)
        progress["forgetting"] = {k: torch.zeros(n, dtype=torch.long if k == "events" else torch.bool, device=device)
                                  for k in ("events", "prev_correct", "ever_correct")}
    runner = run.runner(progress["forgetting"] if track else None)
    last_save = time.monotonic()
    for epoch in range(progress["epoch"] + 1, epochs + 1):
        lr = lr_at_epoch_start(sched, cfg["lr_step"])
        loss_sum, seen = runner.epoch()
        if cfg["lr_step"] == "epoch_end":
            sched.step()
        val_pred = predict(model, dd, "val", cfg["eval_batch_size"], knobs)
        train_loss = float(loss_sum) / seen  # the host waits for the device here, once per epoch
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"loss became {train_loss} at epoch {epoch}; lower lr or regularisation.")
        val_acc = balanced_acc(val_pred, dd.y["val"], c)
        progress["history"].append({"epoch": epoch, "train_loss": train_loss, "val_acc": val_acc, "lr": lr})
        progress["epoch"] = epoch
        if cfg["select"] == "last" or val_acc > progress["best_acc"]:
            progress["best_acc"], progress["best_epoch"] = val_acc, epoch
            progress["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch < epochs and time.monotonic() - last_save >= cfg["checkpoint_seconds"]:
            save_checkpoint(out, cfg, model, opt, sched, gen, progress, time.monotonic() - started)
            if on_checkpoint is not None:
                on_checkpoint()
            last_save = time.monotonic()
        inject_crash(out, epoch=epoch)
        if report is not None:
            report(progress["history"][-1])
    trained_at = time.monotonic()
    train_seconds = progress["seconds"] + trained_at - started  # with the attempts before a resume
    model.load_state_dict(progress["best_state"])
    best_epoch, history = progress["best_epoch"], progress["history"]

    if track:
        f = progress["forgetting"]
        np.savez_compressed(out / "forgetting.npz", events=f["events"].cpu().numpy(),
                            ever_correct=f["ever_correct"].cpu().numpy(), labels=dd.y["train"].cpu().numpy())
    return finish_run(out, cfg, model, dd, knobs, epochs=epochs, best_epoch=best_epoch, history=history,
                      train_seconds=train_seconds, eval_started=trained_at)


def finish_run(out: Path, cfg: dict[str, Any], model: Network, dd: DeviceData, knobs: Knobs | None, *,
               epochs: int, best_epoch: int, history: list[dict[str, Any]], train_seconds: float,
               eval_started: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the trained (best-epoch) ``model``, write its artifacts
    (:func:`~trainables.run_files.save_run`) and return its metrics: the end of :func:`train`, shared
    with the fused trainer (trainables/fused.py). ``eval_started``: the ``time.monotonic()`` from
    which ``eval_seconds`` counts; ``extra``: further metrics keys."""
    metrics = evaluate(model, dd, cfg, knobs)
    metrics.update(
        config_hash=config_hash(cfg), seed=cfg["seed"], epochs=epochs, best_epoch=best_epoch,
        data_fingerprint=data_fingerprint(dd.data),
        train_seconds=train_seconds, eval_seconds=time.monotonic() - eval_started,
        node=socket.gethostname(), device=str(dd.device), torch_version=torch.__version__,
        python_version=platform.python_version(), history=history, **(extra or {}),
    )
    save_run(out, cfg, model, metrics)
    return metrics

