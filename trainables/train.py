"""Train and measure one model, top to bottom.

``train(cfg, out_dir)`` is the whole experiment for one (config, seed): load the long-tailed data
onto the device, build the model, train with SGD + cosine schedule keeping the best validation
epoch, then measure FDR and per-class accuracy with every post-hoc LA variant (its tau/gamma chosen
on validation logits). It writes what produced the result next to the result:
``config.json``, ``model.pt``, ``logits.npz`` and ``metrics.json`` in ``out_dir``.

The data lives on the training device as one uint8 tensor and is augmented with batched tensor ops
(no DataLoader); the loop only synchronises with the host once per epoch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import config_hash, resolve_config
from trainables.data import LTDataset, load_dataset
from trainables.errors import WbsweepError
from trainables.heads import apply_maxnorm_, maxnorm_threshold
from trainables.losses import cb_weights, class_balanced_loss, dot_regression_loss, feature_regularisation
from trainables.metrics import fdr, group_accuracy, per_class_recall
from trainables.models import ModelSpec, Network, build_model, fix_batchnorm_, weight_decay_groups
from trainables.posthoc import adjust_logits, default_grid, tune_la

Reporter = Callable[[dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial stops with this reason instead of writing NaN rows."""


# --- data on the device --------------------------------------------------------------------------


def crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-padded random crop + horizontal flip of a uint8 batch (B, C, H, W), per image.

    The same distribution as torchvision's RandomCrop(H, padding=pad) + RandomHorizontalFlip():
    offsets uniform over 0..2*pad in each axis, flip with probability 1/2, zero padding before
    normalisation (as torchvision pads the raw image)."""
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(b, device=dev)[:, None, None], :, rows, cols]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out).contiguous()


class DeviceData:
    """The dataset's splits as uint8 tensors on ``device`` plus normalisation and augmentation."""

    def __init__(self, data: LTDataset, device: torch.device):
        self.data = data
        self.device = device
        self.x = {s: getattr(data, f"x_{s}").to(device) for s in ("train", "val", "test")}
        self.y = {s: getattr(data, f"y_{s}").to(device) for s in ("train", "val", "test")}
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)

    def prepare(self, x_u8: torch.Tensor, augment: bool, generator: torch.Generator) -> torch.Tensor:
        if augment and self.data.augment == "crop_flip":
            x_u8 = crop_flip(x_u8, 4, generator)
        return (x_u8.float() / 255.0 - self.mean) / self.std


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def features_and_logits(
    model: Network, dd: DeviceData, split: str, batch: int, augment: bool = False, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-input features and logits of a whole split, in eval mode, on the CPU."""
    model.eval()
    gen = torch.Generator(device=dd.device).manual_seed(seed)
    feats, logits = [], []
    x = dd.x[split]
    for i in range(0, len(x), batch):
        f = model.backbone(dd.prepare(x[i : i + batch], augment, gen))
        feats.append(f.float().cpu())
        logits.append(model.classifier(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def balanced_acc(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    recall = per_class_recall(logits.argmax(1).cpu().numpy(), labels.cpu().numpy(), num_classes)
    return float(np.nanmean(recall) * 100)


# --- the run ---------------------------------------------------------------------------------


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


def train(cfg_in: dict[str, Any], out_dir: str | Path, report: Reporter | None = None) -> dict[str, Any]:
    """Train one model as ``cfg_in`` says, write its artifacts to ``out_dir`` and return its metrics.

    ``report`` is called once per epoch with ``epoch``, ``train_loss``, ``val_acc`` and ``lr``
    (Ray Tune's reporter when run as a trial). Raises :class:`TrainingDiverged` on a NaN loss.
    """
    cfg = resolve_config(cfg_in)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    device = pick_device(cfg["device"])

    data = load_dataset(cfg["dataset"], cfg["data_root"], cfg["rho"], val_per_class=cfg["val_per_class"])
    dd = DeviceData(data, device)
    c = data.num_classes
    model = build_model(
        ModelSpec(
            cfg["model"], c, data.x_train.shape[1], data.x_train.shape[-1], cfg["classifier"],
            cfg["etf_bias"], cfg["width"], etf_seed=cfg["seed"],
        )
    ).to(device)

    stage2 = bool(cfg["stage2"])
    if stage2:
        # WB stage 2: start from the stage-1 model of the same seed, train only the classifier.
        state = torch.load(cfg["init_from"], map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        model.backbone.requires_grad_(False)
        threshold = maxnorm_threshold(model.classifier.weight.detach(), cfg["maxnorm_alpha"])
        epochs, wd, loss_kind = cfg["stage2_epochs"], cfg["stage2_wd"], cfg["stage2_loss"]
        groups = [{"params": [p for p in model.classifier.parameters() if p.requires_grad], "weight_decay": wd}]
    else:
        if cfg["bn"] == "fixed":
            fix_batchnorm_(model, cfg["bn_scale"])
        epochs, wd, loss_kind = cfg["epochs"], cfg["wd"], cfg["loss"]
        groups = weight_decay_groups(model, wd, cfg["wd_scope"])
        threshold = None
    if loss_kind == "dr" and cfg["classifier"] != "etf":
        raise WbsweepError("the DR loss needs the fixed ETF classifier (classifier: etf).")

    loss_fn = make_loss(cfg, loss_kind, data.class_counts, device)
    opt = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    n, bs = len(dd.x["train"]), cfg["batch_size"]

    # Resume from this run's own checkpoint when a crashed or preempted trial is retried.
    progress = resume(out, cfg, model, opt, sched, gen)
    track = cfg["track_forgetting"] and not stage2
    if track and "forgetting" not in progress:
        # Toneva et al.'s forgetting events, per training image, kept on the device (figure 4)
        progress["forgetting"] = {k: torch.zeros(n, dtype=torch.long if k == "events" else torch.bool, device=device)
                                  for k in ("events", "prev_correct", "ever_correct")}
    last_save = time.time()
    for epoch in range(progress["epoch"] + 1, epochs + 1):
        model.train()
        if stage2:
            model.backbone.eval()  # frozen features: BN running statistics stay as trained
        perm = torch.randperm(n, device=device, generator=gen)
        if n % bs == 1:  # a batch of one breaks BatchNorm in train mode
            perm = perm[:-1]
        loss_sum = torch.zeros((), device=device)
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            x = dd.prepare(dd.x["train"][idx], True, gen)
            y = dd.y["train"][idx]
            feats = model.backbone(x)
            logits = model.classifier(feats)
            loss = loss_fn(feats, logits, y, model)
            if track:
                f, correct = progress["forgetting"], logits.detach().argmax(1) == y
                f["events"][idx] += (f["prev_correct"][idx] & ~correct).long()
                f["ever_correct"][idx] |= correct
                f["prev_correct"][idx] = correct
            if cfg["fr"] > 0 and not stage2:
                loss = loss + feature_regularisation(feats, cfg["fr"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if threshold is not None and cfg["maxnorm"] == "iter":
                apply_maxnorm_(model.classifier.weight.data, threshold)
            loss_sum += loss.detach() * len(idx)
        if threshold is not None and cfg["maxnorm"] == "epoch":
            apply_maxnorm_(model.classifier.weight.data, threshold)
        lr = sched.get_last_lr()[0]
        sched.step()
        train_loss = float(loss_sum) / len(perm)  # the one host synchronisation of the epoch
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"loss became {train_loss} at epoch {epoch}; lower lr or regularisation.")
        _, val_logits = features_and_logits(model, dd, "val", cfg["eval_batch_size"])
        val_acc = balanced_acc(val_logits, dd.y["val"], c)
        progress["history"].append({"epoch": epoch, "train_loss": train_loss, "val_acc": val_acc, "lr": lr})
        progress["epoch"] = epoch
        if cfg["select"] == "last" or val_acc > progress["best_acc"]:
            progress["best_acc"], progress["best_epoch"] = val_acc, epoch
            progress["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch < epochs and time.time() - last_save >= cfg["checkpoint_seconds"]:
            save_checkpoint(out, cfg, model, opt, sched, gen, progress, time.time() - started)
            last_save = time.time()
        inject_crash(out, epoch)
        if report is not None:
            report(progress["history"][-1])
    train_seconds = progress["seconds"] + time.time() - started
    model.load_state_dict(progress["best_state"])
    best_epoch, history = progress["best_epoch"], progress["history"]

    if track:
        f = progress["forgetting"]
        np.savez_compressed(out / "forgetting.npz", events=f["events"].cpu().numpy(),
                            ever_correct=f["ever_correct"].cpu().numpy(), labels=dd.y["train"].cpu().numpy())
    metrics = evaluate(model, dd, cfg)
    metrics.update(
        config_hash=config_hash(cfg), seed=cfg["seed"], epochs=epochs, best_epoch=best_epoch,
        train_seconds=train_seconds, eval_seconds=time.time() - started - train_seconds,
        node=socket.gethostname(), device=str(device), torch_version=torch.__version__,
        python_version=platform.python_version(), history=history,
    )
    save_run(out, cfg, model, metrics)
    return metrics


# --- checkpoints: nothing lost when a trial is killed -----------------------------------------

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out: Path, cfg: dict[str, Any], model: Network, opt, sched, gen: torch.Generator,
                    progress: dict[str, Any], seconds: float) -> None:
    """Everything needed to continue bit-for-bit: weights, optimizer and schedule, the data RNG and
    the best epoch so far. Written to a temporary name and renamed, so a crash mid-write leaves the
    previous checkpoint intact."""
    state = {
        "config_hash": config_hash(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "generator": gen.get_state(),
        **{k: v for k, v in progress.items() if k != "seconds"}, "seconds": progress["seconds"] + seconds,
    }
    torch.save(state, out / f"{CHECKPOINT}.tmp")
    os.replace(out / f"{CHECKPOINT}.tmp", out / CHECKPOINT)


def resume(out: Path, cfg: dict[str, Any], model: Network, opt, sched, gen: torch.Generator) -> dict[str, Any]:
    """The training progress to continue from: this run's checkpoint if it has one (of the same
    config), else a fresh start."""
    fresh: dict[str, Any] = {"epoch": 0, "best_acc": -1.0, "best_epoch": 0, "best_state": None, "history": [],
                             "seconds": 0.0}
    path = out / CHECKPOINT
    if not path.exists():
        return fresh
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict moves to device
    except Exception:  # a torn or foreign file: start over rather than fail the trial
        return fresh
    if state.get("config_hash") != config_hash(cfg):
        return fresh
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return {k: state[k] for k in (*fresh, "forgetting") if k in state}


def inject_crash(out: Path, epoch: int) -> None:
    """Fault injection for tests: with WBSWEEP_INJECT_CRASH=N the process dies at the end of epoch
    N, once per run (a marker file stops the retried trial from dying again)."""
    at = os.environ.get("WBSWEEP_INJECT_CRASH")
    marker = out / ".crash-injected"
    if at and int(at) == epoch and not marker.exists():
        marker.write_text(str(epoch))
        os._exit(17)


def evaluate(model: Network, dd: DeviceData, cfg: dict[str, Any]) -> dict[str, Any]:
    """FDR of train and test features and Many/Medium/Few/avg test accuracy per LA variant.

    LA is post hoc: tau and gamma are chosen on the validation logits of this very model and
    applied to its test logits; nothing is retrained. The logits needed to redo this are kept."""
    data, c, eb = dd.data, dd.data.num_classes, cfg["eval_batch_size"]
    train_feats, _ = features_and_logits(model, dd, "train", eb, augment=cfg["fdr_train_augment"], seed=1)
    test_feats, test_logits = features_and_logits(model, dd, "test", eb)
    _, val_logits = features_and_logits(model, dd, "val", eb)
    y_train, y_val, y_test = (dd.y[s].cpu().numpy() for s in ("train", "val", "test"))
    weight = model.classifier.weight.detach().float().cpu()
    bias = model.classifier.bias
    bias_np = bias.detach().float().cpu().numpy() if bias is not None else np.zeros(c, dtype=np.float32)
    norms = weight.norm(dim=1).numpy()
    prior, groups = data.prior, data.groups()
    arrays = {
        "val_logits": val_logits.numpy(), "val_labels": y_val, "test_logits": test_logits.numpy(),
        "test_labels": y_test, "bias": bias_np, "weight_norms": norms, "prior": prior,
        "class_counts": np.asarray(data.class_counts),
    }
    la_results: dict[str, dict[str, Any]] = {}
    for la in cfg["la"]:
        grid = cfg["tau_grid"] if la == "add" else cfg["gamma_grid"] if la == "mult" else None
        grid = grid or default_grid(la)
        kw = dict(bias=bias_np, weight_norms=norms, mult_form=cfg["la_mult_form"])
        param, val_acc = tune_la(arrays["val_logits"], y_val, la, prior, grid=grid, num_classes=c, **kw)
        adjusted = adjust_logits(arrays["test_logits"], la, param or 0.0, prior, **kw)
        recall = per_class_recall(adjusted.argmax(1), y_test, c)
        la_results[la] = {"param": param, "val_acc": val_acc, **group_accuracy(recall, groups),
                          "acc_per_class": [float(r * 100) for r in recall]}
    return {
        "fdr_train": fdr(train_feats.numpy().astype(np.float64), y_train, c),
        "fdr_test": fdr(test_feats.numpy().astype(np.float64), y_test, c),
        "la": la_results,
        "objective": max(r["val_acc"] for r in la_results.values()),
        "_arrays": arrays,
    }


def save_run(out: Path, cfg: dict[str, Any], model: Network, metrics: dict[str, Any]) -> None:
    """Write config, checkpoint, logits and metrics; metrics.json last and atomically, because its
    presence is what marks the run as finished."""
    arrays = metrics.pop("_arrays")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    torch.save({"model": model.state_dict(), "config": cfg}, out / "model.pt.tmp")
    os.replace(out / "model.pt.tmp", out / "model.pt")
    with open(out / "logits.npz.tmp", "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(out / "logits.npz.tmp", out / "logits.npz")
    (out / "metrics.json.tmp").write_text(json.dumps(metrics, indent=2, default=float))
    os.replace(out / "metrics.json.tmp", out / "metrics.json")
    (out / CHECKPOINT).unlink(missing_ok=True)  # model.pt now holds the result


def load_metrics(out_dir: str | Path) -> dict[str, Any] | None:
    """The metrics of a finished run in ``out_dir``, or None if it has not finished."""
    path = Path(out_dir) / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())
