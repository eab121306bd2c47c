"""Train and measure one model, top to bottom.

``train(cfg, out_dir)`` is the whole experiment for one (config, seed): load the long-tailed data
onto the device, build the model, train with SGD + cosine schedule keeping the best validation
epoch, then measure FDR and per-class accuracy with every post-hoc LA variant (its tau/gamma chosen
on validation logits). It writes what produced the result next to the result:
``config.json``, ``model.pt``, ``logits.npz`` and ``metrics.json`` in ``out_dir``.

Speed without changing the science (docs/DESIGN.md section 6):

* the data lives on the training device as one uint8 tensor; each epoch's order, random crop and
  flip are drawn on the device and applied as batched tensor ops (no DataLoader, no per-sample
  transforms), a chunk of many batches at a time;
* :class:`EpochRunner` runs an epoch without synchronising with the host: the loss is summed on
  the device and read once, with the validation predictions, after the epoch;
* SGD is PyTorch's fused implementation (one pass over each parameter instead of four);
* the knobs ``channels_last``, ``precision`` (fp32 | bf16 autocast), ``compile`` (off | torch.compile |
  a CUDA graph of the whole step) and ``eval_batch_size`` (see trainables/config.py).

The benchmark (orchestrator/bench.py) trains with the same :func:`build_training` and
:class:`EpochRunner` that :func:`train` uses, against the naive trainer of trainables/reference.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
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
from torch import nn

from trainables import storage
from trainables.augment import device_transform
from trainables.config import LA_KINDS, config_hash, objective, resolve_config
from trainables.data import LTDataset, data_fingerprint
from trainables.datacache import cached_dataset
from trainables.errors import WbsweepError
from trainables.heads import apply_maxnorm_, maxnorm_threshold
from trainables.losses import cb_weights, class_balanced_loss, dot_regression_loss, feature_regularisation
from trainables.metrics import fdr, group_accuracy, per_class_recall
from trainables.models import ModelSpec, Network, build_model, fix_batchnorm_, weight_decay_groups
from trainables.posthoc import adjust_logits, default_grid, tune_la
from trainables.step import GRAPH_MODES, CompiledStep

Reporter = Callable[[dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial stops with this reason instead of writing NaN rows."""


# --- data on the device --------------------------------------------------------------------------


def draw_crop_flip(b: int, pad: int, generator: torch.Generator | None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image crop offsets (top ``oy``, left ``ox``, each uniform over 0..2*pad) and flips (p = 1/2),
    drawn on ``device`` in this order from ``generator``."""
    oy = torch.randint(0, 2 * pad + 1, (b,), device=device, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=device, generator=generator)
    flip = torch.rand(b, device=device, generator=generator) < 0.5
    return oy, ox, flip


def crop_flip_at(x: torch.Tensor, pad: int, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Image i of the uint8 batch ``x`` (B, C, H, W), zero-padded by ``pad``, cropped back to H x W at
    row ``oy[i]``, column ``ox[i]`` of the padded image, then mirrored left-right where ``flip[i]``:
    torchvision's ``hflip(crop(pad(img, pad), oy, ox, H, W))``, for the whole batch in one gather."""
    b, c, h, w = x.shape
    dev = x.device
    wp = w + 2 * pad
    padded = F.pad(x, (pad, pad, pad, pad)).reshape(b, c, -1)
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + ox[:, None]  # (B, W): source column
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H): source row
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.gather(2, index).reshape(b, c, h, w)


def crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Zero-padded random crop + horizontal flip of a uint8 batch (B, C, H, W), per image.

    The same distribution as torchvision's RandomCrop(H, padding=pad) + RandomHorizontalFlip():
    offsets uniform over 0..2*pad in each axis, flip with probability 1/2, zero padding before
    normalisation (as torchvision pads the raw image)."""
    return crop_flip_at(x, pad, *draw_crop_flip(x.shape[0], pad, generator, x.device))


class DeviceData:
    """The dataset's splits as uint8 tensors on ``device`` plus normalisation and augmentation."""

    def __init__(self, data: LTDataset, device: torch.device, augment: str = "auto"):
        """``augment``: the training option (``auto`` = the dataset's own augmentation)."""
        self.data = data
        self.device = device
        self.x = {s: getattr(data, f"x_{s}").to(device) for s in ("train", "val", "test")}
        self.y = {s: getattr(data, f"y_{s}").to(device) for s in ("train", "val", "test")}
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.augment = data.augment if augment == "auto" else augment
        self.crop = self.augment == "crop_flip"
        # mini-ImageNet's training images are stored larger than the model's input (the 256-px centre
        # square): RandomResizedCrop + flip when augmenting, else CenterCrop (trainables/augment.py)
        self.size = data.x_val.shape[-1]
        self.resized_crop = self.augment == "resized_crop_flip"

    def normalise(self, x_u8: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """(x / 255 - mean) / std in float32: the same operations, in the same order, as torchvision's
        ToTensor + Normalize, so the values are bit-identical to the reference trainer's."""
        if channels_last:
            x_u8 = x_u8.contiguous(memory_format=torch.channels_last)  # elementwise ops keep the layout
        return (x_u8.float() / 255.0 - self.mean) / self.std

    def prepare(self, x_u8: torch.Tensor, augment: bool, generator: torch.Generator | None,
                channels_last: bool = False) -> torch.Tensor:
        if self.resized_crop or x_u8.shape[-1] != self.size:
            x_u8 = device_transform(x_u8, self.size, augment and self.resized_crop, generator)
        elif augment and self.crop:
            x_u8 = crop_flip(x_u8, 4, generator)
        return self.normalise(x_u8, channels_last)


# --- speed knobs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knobs:
    """The speed knobs of a run, resolved for its device (config keys ``channels_last``,
    ``precision``, ``compile``). ``compile`` is one of off | torch | cudagraph | cudagraph+torch
    here; "auto" is resolved by :meth:`resolve`. ``strict`` says it was asked for by name, so a failed CUDA-graph
    capture or compilation is an error rather than a warning and a fall-back to eager steps."""

    channels_last: bool = False
    precision: str = "fp32"
    compile: str = "off"
    strict: bool = False

    @classmethod
    def resolve(cls, cfg: dict[str, Any], device: torch.device, conv: bool = False, steps: int = 0) -> Knobs:
        """compile "auto": the CUDA-graph step on a GPU; on a CPU torch.compile for a convolutional
        model (``conv``) whose run has at least AUTO_COMPILE_MIN_STEPS steps (``steps``), where
        the minute or two of compilation is repaid (about 1.5x faster steps for resnet32), else off."""
        mode = cfg["compile"]
        if mode == "auto":
            if device.type == "cuda":
                mode = "cudagraph"
            else:
                mode = "torch" if conv and steps >= AUTO_COMPILE_MIN_STEPS else "off"
        elif mode in GRAPH_MODES and device.type != "cuda":
            raise WbsweepError(f"compile={mode} captures the training step as a CUDA graph and needs a CUDA "
                               f"device, but this run is on {device.type}; use compile=auto or off.")
        if cfg["precision"] == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise WbsweepError("precision=bf16 needs a GPU with bfloat16 support (Ampere or newer); use fp32.")
        return cls(bool(cfg["channels_last"]), cfg["precision"], mode, strict=cfg["compile"] != "auto")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16: autocast of matmuls and convolutions to bfloat16. Parameters (BN's included), BN's
        running statistics and its reductions stay in float32 (autocast never casts parameters,
        and the BN kernels accumulate in float32); the loss is computed in float32. No cast cache:
        each weight is cast once per forward anyway, and a CUDA graph must record every cast."""
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()


#: Steps from which compile "auto" compiles a convolutional model on a CPU (a 320-epoch CIFAR100-LT
#: run has 52,000; the tests' and the cpu preset's runs have far fewer).
AUTO_COMPILE_MIN_STEPS = 2000


def has_conv(model: nn.Module) -> bool:
    """channels_last only concerns models with 2-D convolutions (for an MLP it would only add copies)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@functools.lru_cache(maxsize=1)
def retain_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MB for reuse instead of returning each to the
    kernel (its default for blocks over 128 kB-32 MB, depending on history): a CPU training step frees
    and allocates the same few-MB gradients and activations every step, and memory handed back is
    page-faulted in again (hundreds of faults per step for an MLP of width 1024). Process-wide, so in
    ``wbsweep bench`` the naive trainer gets it too. False where the C library is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=8)
def fused_sgd_available(device: torch.device) -> bool:
    """Whether this torch has a fused SGD kernel for ``device`` (CUDA since 2.2 or so, CPU since 2.4)."""
    try:
        p, g = torch.zeros(2, device=device), torch.ones(2, device=device)
        torch._fused_sgd_([p], [g], [], weight_decay=0.0, momentum=0.0, lr=0.5, dampening=0.0, nesterov=False,
                          maximize=False, is_first_step=False)
        return bool(p[0] == -0.5)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def make_sgd(groups: list[dict], lr: float, momentum: float, device: torch.device) -> torch.optim.SGD:
    """SGD with coupled weight decay (the paper's), PyTorch's fused implementation where it exists:
    the same update as the default one in one pass over each tensor (equal to fp32 rounding)."""
    if fused_sgd_available(torch.device(device)):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def features_and_logits(
    model: Network, dd: DeviceData, split: str, batch: int, augment: bool = False, seed: int = 0,
    knobs: Knobs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-input features and logits of a whole split, in eval mode, on the CPU (float32)."""
    model.eval()
    knobs = knobs or Knobs()
    cl = knobs.channels_last and has_conv(model)
    gen = torch.Generator(device=dd.device).manual_seed(seed)
    feats, logits = [], []
    x = dd.x[split]
    for i in range(0, len(x), batch):
        with knobs.autocast(dd.device):
            f = model.backbone(dd.prepare(x[i : i + batch], augment, gen, cl))
            z = model.classifier(f)
        feats.append(f.float().cpu())
        logits.append(z.float().cpu())
    return torch.cat(feats), torch.cat(logits)


@torch.no_grad()
def predict(model: Network, dd: DeviceData, split: str, batch: int, knobs: Knobs | None = None) -> torch.Tensor:
    """Predicted classes of a split, in eval mode, left on the device (no host synchronisation)."""
    model.eval()
    knobs = knobs or Knobs()
    cl = knobs.channels_last and has_conv(model)
    x, preds = dd.x[split], []
    for i in range(0, len(x), batch):
        with knobs.autocast(dd.device):
            preds.append(model(dd.prepare(x[i : i + batch], False, None, cl)).argmax(1))
    return torch.cat(preds)


def balanced_acc(logits_or_pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean per-class recall in % from logits (N, C) or predicted classes (N,)."""
    pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == 2 else logits_or_pred
    recall = per_class_recall(pred.cpu().numpy(), labels.cpu().numpy(), num_classes)
    return float(np.nanmean(recall) * 100)


# --- one training step, one epoch ------------------------------------------------------------

def chunk_images(dd: DeviceData, batch_size: int) -> int:
    """Training images prepared (gathered, augmented, normalised) at a time: whole batches of float
    images, few ops per epoch, bounded memory (256 MB on a GPU, 32 MB on a CPU). The augmentation is
    drawn per chunk, so a trainer that wants another's exact draws uses the same chunks."""
    budget = (256 if dd.device.type == "cuda" else 32) * 2**20
    image_bytes = 4 * max(1, dd.x["train"][0].numel())
    return max(1, budget // (image_bytes * batch_size)) * batch_size


class EpochRunner(CompiledStep):
    """Trains ``model`` one epoch at a time on device-resident data, as the config says.

    An epoch: a random order of the training images (the last image is left out when it would
    form a batch of one, which train-mode BatchNorm cannot take), then per chunk of batches the
    images are gathered, augmented (:func:`crop_flip`) and normalised with a few batched ops, and
    per batch one step: forward, loss (+ FR), backward, fused SGD, MaxNorm when ``maxnorm`` is
    "iter". MaxNorm "epoch" projects once after the epoch. Forgetting events (``forgetting``, the
    per-image state) are counted from each step's logits. The loss is summed on the device;
    :meth:`epoch` returns that sum and the number of images without waiting for the device.

    ``knobs.compile``: "torch" runs the full batches' forward and loss through ``torch.compile``;
    "cudagraph" captures a full batch's whole step (forward, backward, SGD with the learning rate
    read from a device tensor, MaxNorm, loss sum) as one CUDA graph after a few eager warm-up
    steps and replays it, the data preparation staying outside the graph (it fills the graph's
    static input); "cudagraph+torch" captures the torch.compile'd step the same way. The last,
    smaller batch of an epoch always runs eagerly, so every mode trains on exactly the same batches.
    """

    def __init__(self, model: Network, dd: DeviceData, opt: torch.optim.Optimizer, loss_fn: Callable, *,
                 batch_size: int, knobs: Knobs, generator: torch.Generator, fr: float = 0.0,
                 threshold: float | None = None, maxnorm: str = "none", frozen_backbone: bool = False,
                 forgetting: dict[str, torch.Tensor] | None = None):
        self.model, self.dd, self.opt, self.loss_fn = model, dd, opt, loss_fn
        self.gen = generator
        self.fr, self.threshold, self.maxnorm = fr, threshold, maxnorm
        self.frozen_backbone, self.forgetting = frozen_backbone, forgetting
        self.init_step(knobs, dd.device, batch_size)
        self.channels_last = knobs.channels_last and has_conv(model)
        self.loss_sum = torch.zeros((), device=self.device)
        self.chunk = chunk_images(dd, self.bs)
        # On a GPU the fused SGD reads the learning rate from a float32 device tensor per parameter
        # group, refilled every epoch: a CUDA graph cannot bake it in, and eager and captured steps
        # then compute the very same update.
        self._lr: list[torch.Tensor] = []
        fused = all(g.get("fused") for g in opt.param_groups)
        if self.device.type == "cuda" and fused:
            self._lr = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device)
                        for g in opt.param_groups]
        elif self.mode in GRAPH_MODES:  # without a device learning rate a graph would keep the first epoch's
            self._abandon_graph(RuntimeError("this torch has no fused SGD for the device"))
        self._align_optimizer_state()
        # On a CPU each parameter's SGD update runs inside the backward pass, as soon as its gradient
        # is complete (see :meth:`_sgd_hook`); on a GPU the step stays one fused call (and graphable).
        self._sgd_in_backward = self.device.type == "cpu" and fused and not self._lr
        self._stepping = False
        self._group_index: dict[torch.Tensor, int] = {}
        if self._sgd_in_backward:
            retain_freed_memory()
            for i, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    if p.requires_grad and p not in self._group_index:
                        self._group_index[p] = i
                        p.register_post_accumulate_grad_hook(self._sgd_hook)

    def _align_optimizer_state(self) -> None:
        """Momentum buffers with their parameter's memory layout (a checkpoint written with another
        channels_last setting has other strides), as the fused SGD kernels require."""
        for group in self.opt.param_groups:
            for p in group["params"]:
                buf = self.opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None and buf.stride() != p.stride():
                    self.opt.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)

    # --- the step ---

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.knobs.autocast(self.device):
            feats = self.model.backbone(x)
            logits = self.model.classifier(feats)
        feats, logits = feats.float(), logits.float()  # no-ops in fp32; the loss is always fp32
        loss = self.loss_fn(feats, logits, y, self.model)
        if self.fr > 0:
            loss = loss + feature_regularisation(feats, self.fr)
        return loss, logits

    def _sgd_hook(self, p: torch.Tensor) -> None:
        """SGD update of ``p`` the moment autograd has accumulated its gradient (a post-accumulate-grad
        hook, active only inside :meth:`_eager_step`): PyTorch's fused SGD kernel on this one tensor
        with its group's hyperparameters and momentum buffer, the very update ``opt.step()`` makes
        (bit-identical, tested), and the gradient is dropped at once. Autograd has already used ``p``
        for every gradient it needs (the node that saved ``p`` computed its gradients before this
        hook), so later layers' gradients are those of the weights before the step. Why: the
        gradient is updated from while it is still in the cache, and its memory is reused by the
        next layer's gradient, instead of one pass over every parameter, gradient and buffer after
        the backward pass (an MLP of width 1024 has 35 MB of them)."""
        if not self._stepping or p.grad is None:
            return
        group = self.opt.param_groups[self._group_index[p]]
        momentum = group["momentum"]
        bufs: list[torch.Tensor] = []
        first = False
        if momentum != 0:
            state = self.opt.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:  # the first step: the buffer becomes the (decayed) gradient
                buf = state["momentum_buffer"] = torch.empty_like(p)
                first = True
            bufs = [buf]
        torch._fused_sgd_([p], [p.grad], bufs, weight_decay=group["weight_decay"], momentum=momentum,
                          lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                          maximize=group["maximize"], is_first_step=first)
        p.grad = None

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor, forward: Callable) -> torch.Tensor:
        loss, logits = forward(x, y)
        if self._sgd_in_backward and not self._lr:  # each hook drops its gradient: nothing to zero
            self._stepping = True
            try:
                loss.backward()  # the SGD step too: each parameter as its gradient is complete (_sgd_hook)
            finally:
                self._stepping = False
            # what opt.step() would have recorded: the schedule then knows the optimizer stepped
            self.opt._opt_called = True  # type: ignore[attr-defined]
        elif self._lr:
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            saved = [g["lr"] for g in self.opt.param_groups]
            for g, t in zip(self.opt.param_groups, self._lr, strict=True):
                g["lr"] = t
            try:
                self.opt.step()
            finally:
                for g, lr in zip(self.opt.param_groups, saved, strict=True):
                    g["lr"] = lr
        else:
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        if self.maxnorm == "iter" and self.threshold is not None:
            apply_maxnorm_(self.model.classifier.weight.data, self.threshold)
        self.loss_sum.add_(loss.detach() * y.shape[0])
        return logits.detach()

    def _clear_grads(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    # --- the epoch ---

    def _track_forgetting(self, idx: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Toneva et al.'s forgetting events per training image (figure 4), kept on the device."""
        f, correct = self.forgetting, logits.argmax(1) == y
        f["events"][idx] += (f["prev_correct"][idx] & ~correct).long()
        f["ever_correct"][idx] |= correct
        f["prev_correct"][idx] = correct

    def epoch(self, order: torch.Tensor | None = None, augment: bool = True) -> tuple[torch.Tensor, int]:
        """Train one epoch; returns (the loss summed over its images, on the device; their number).

        ``order`` (indices into the training set) replaces the random order, ``augment=False``
        turns crop and flip off: both for comparing with another trainer on the same batches."""
        self.model.train()
        if self.frozen_backbone:
            self.model.backbone.eval()  # frozen features: BN running statistics stay as trained
        x_all, y_all = self.dd.x["train"], self.dd.y["train"]
        if order is None:
            order = torch.randperm(len(x_all), device=self.device, generator=self.gen)
            if len(order) % self.bs == 1:  # a batch of one breaks BatchNorm in train mode
                order = order[:-1]
        self.loss_sum.zero_()
        self.opt.zero_grad(set_to_none=True)  # with the SGD in the backward pass, gradients only live inside it
        if self._lr:  # this epoch's learning rate
            for t, g in zip(self._lr, self.opt.param_groups, strict=True):
                t.fill_(float(g["lr"]))
        for start in range(0, len(order), self.chunk):
            idx = order[start : start + self.chunk]
            x = self.dd.prepare(x_all[idx], augment, self.gen, self.channels_last)
            y = y_all[idx]
            for i in range(0, len(idx), self.bs):
                logits = self.step(x[i : i + self.bs], y[i : i + self.bs])
                if self.forgetting is not None:
                    self._track_forgetting(idx[i : i + self.bs], logits, y[i : i + self.bs])
        if self.maxnorm == "epoch" and self.threshold is not None:
            apply_maxnorm_(self.model.classifier.weight.data, self.threshold)
        return self.loss_sum, len(order)


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
        state = torch.load(cfg["init_from"], map_location=device, weights_only=True)
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
    started = time.time()
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
    last_save = time.time()
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
        if epoch < epochs and time.time() - last_save >= cfg["checkpoint_seconds"]:
            save_checkpoint(out, cfg, model, opt, sched, gen, progress, time.time() - started)
            if on_checkpoint is not None:
                on_checkpoint()
            last_save = time.time()
        inject_crash(out, epoch=epoch)
        if report is not None:
            report(progress["history"][-1])
    trained_at = time.time()
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
    """Evaluate the trained (best-epoch) ``model``, write its artifacts (:func:`save_run`) and return
    its metrics: the end of :func:`train`, shared with the fused trainer (trainables/fused.py).
    ``eval_started``: the time from which ``eval_seconds`` counts; ``extra``: further metrics keys."""
    metrics = evaluate(model, dd, cfg, knobs)
    metrics.update(
        config_hash=config_hash(cfg), seed=cfg["seed"], epochs=epochs, best_epoch=best_epoch,
        data_fingerprint=data_fingerprint(dd.data),
        train_seconds=train_seconds, eval_seconds=time.time() - eval_started,
        node=socket.gethostname(), device=str(dd.device), torch_version=torch.__version__,
        python_version=platform.python_version(), history=history, **(extra or {}),
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
        "config_hash": config_hash(cfg), "seed": cfg["seed"], "model": model.state_dict(),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
        **{k: v for k, v in progress.items() if k != "seconds"}, "seconds": progress["seconds"] + seconds,
    }
    torch.save(state, out / f"{CHECKPOINT}.tmp")
    os.replace(out / f"{CHECKPOINT}.tmp", out / CHECKPOINT)


def resume(out: Path, cfg: dict[str, Any], model: Network, opt, sched, gen: torch.Generator) -> dict[str, Any]:
    """The training progress to continue from: this run's checkpoint if it has one (of the same
    config and seed: the seed is not in the config hash, and a folder reused for another seed
    must not continue that seed's training), else a fresh start."""
    fresh: dict[str, Any] = {"epoch": 0, "best_acc": -1.0, "best_epoch": 0, "best_state": None, "history": [],
                             "seconds": 0.0}
    path = out / CHECKPOINT
    if not path.exists():
        return fresh
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict moves to device
    except Exception:  # a torn or foreign file: start over rather than fail the trial
        return fresh
    if state.get("config_hash") != config_hash(cfg) or state.get("seed", cfg["seed"]) != cfg["seed"]:
        return fresh
    model.load_state_dict(state["model"])
    # How the update is computed (fused or not) is this process's choice, not the checkpoint's.
    how = [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups]
    opt.load_state_dict(state["optimizer"])
    for group, flags in zip(opt.param_groups, how, strict=True):
        group.update(flags)
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    progress = {k: state[k] for k in (*fresh, "forgetting") if k in state}
    if "forgetting" in progress:
        progress["forgetting"] = {k: v.to(gen.device) for k, v in progress["forgetting"].items()}
    return progress


def inject_crash(*outs: Path, epoch: int) -> None:
    """Fault injection for tests: with WBSWEEP_INJECT_CRASH=N the process dies at the end of epoch
    N, once per run (a marker file stops the retried trial from dying again); with
    WBSWEEP_INJECT_CRASH_SEEDS=1,2 only the runs of those seeds (fewer restarts, a shorter test).
    ``outs``: the run folders of the process (a fused group's several); every run due to crash is
    marked before the process dies."""
    at = os.environ.get("WBSWEEP_INJECT_CRASH")
    if not at or int(at) != epoch:
        return
    seeds = os.environ.get("WBSWEEP_INJECT_CRASH_SEEDS")
    due = [out for out in outs if not (out / ".crash-injected").exists()
           and not (seeds and out.name not in {f"seed{s.strip()}" for s in seeds.split(",")})]
    for out in due:
        (out / ".crash-injected").write_text(str(epoch))
    if due:
        os._exit(17)


def evaluate(model: Network, dd: DeviceData, cfg: dict[str, Any], knobs: Knobs | None = None) -> dict[str, Any]:
    """FDR of train and test features and Many/Medium/Few/avg test accuracy per LA variant.

    LA is post hoc: tau and gamma are chosen on the validation logits of this very model and
    applied to its test logits; nothing is retrained. The logits needed to redo this are kept."""
    data, c, eb = dd.data, dd.data.num_classes, cfg["eval_batch_size"]
    train_feats, _ = features_and_logits(model, dd, "train", eb, augment=cfg["fdr_train_augment"], seed=1,
                                         knobs=knobs)
    test_feats, test_logits = features_and_logits(model, dd, "test", eb, knobs=knobs)
    _, val_logits = features_and_logits(model, dd, "val", eb, knobs=knobs)
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
    for la in LA_KINDS:  # all of them, whatever cfg["la"] reports: the model folder serves every spec
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
        "objective": objective({"la": la_results}, cfg["la"]),
        "_arrays": arrays,
    }


def save_run(out: Path, cfg: dict[str, Any], model: Network, metrics: dict[str, Any]) -> None:
    """Write config, checkpoint, logits and metrics; metrics.json last and atomically, because its
    presence is what marks the run as finished."""
    arrays = metrics.pop("_arrays")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # the plain layout, whatever trained
    torch.save({"model": state, "config": cfg}, out / "model.pt.tmp")
    os.replace(out / "model.pt.tmp", out / "model.pt")
    with open(out / "logits.npz.tmp", "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(out / "logits.npz.tmp", out / "logits.npz")
    (out / "metrics.json.tmp").write_text(json.dumps(metrics, indent=2, default=float))
    os.replace(out / "metrics.json.tmp", out / "metrics.json")
    (out / CHECKPOINT).unlink(missing_ok=True)  # model.pt now holds the result


def load_metrics(run: str | Path) -> dict[str, Any] | None:
    """The metrics of a finished run (a local folder or a storage location), or None if it has not
    finished. A torn metrics.json counts as not finished: the model is trained again."""
    return storage.read_json_object(storage.join(run, "metrics.json"))
