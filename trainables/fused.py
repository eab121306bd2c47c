"""Fused training: K runs of one architecture trained in one process as one batched model (issue #14).

A paper table is dozens of trainings of the same small network; at batch 64 one of them leaves the
device mostly idle. :func:`train_fused` trains K resolved configs that share the architecture and
the data (see :data:`SHARED_KEYS`) together, in the manner of HFTA (Wang et al., MLSys 2021): the
K models' tensors are stacked along a new leading dimension and each operation of a step runs once
for all K models instead of K times: a linear layer is one batched matrix product (``torch.bmm``),
the K models' BatchNorm1d one BatchNorm of K x C channels, the K CE losses one call, the SGD update
a few multi-tensor ops. The batched forward is written for the layers of the MLP family (Flatten,
Linear, BatchNorm1d, ReLU, ResBlock1d) and of the convolutional models (resnet32's CIFAR ResNet with
its option-A shortcuts; torchvision's BasicBlock and Bottleneck with their conv1x1 + BN downsample,
in :class:`~trainables.models.NarrowResNet` or torchvision's own ResNet; the max-pool stem) by
:class:`FusedModels`, not traced. For a convolutional backbone the activations are laid out
(B, K*C, H, W) and a convolution of the K models is one convolution with K times the groups (the
stacked weight (K, out, in/g, kh, kw) viewed as (K*out, in/g, kh, kw)), a BatchNorm2d one BatchNorm
of K*C channels (each channel's statistics over (B, H, W): each model's own), the option-A zero
channels padded per model; after the global average pool the (B, K*C) features take the MLP layout
(K, C, B) for the classifier and the losses.

``torch.func.vmap`` over ``functional_call`` computes the same and was tried for both families. For
the cpu preset's MLP it was slower than K separate models (its per-call overhead and transposed
products). For resnet32 at width 4, K = 4, batch 64, one thread, forward + backward (+ SGD for the
others), measured on this project's 2-core CPU: K separate models 229 img/s per model (channels_last,
their default) or 146 (NCHW), vmap 489 / 207 (without the SGD), the grouped convolutions 800 / 181:
the grouped convolutions with channels_last are kept. The layout follows the runs' ``channels_last``
knob (the group's first run's; the knob changes no arithmetic beyond rounding).

Nothing of a model's science is shared. Each model

* is built by :func:`trainables.train.build_training` after seeding the global RNGs with its own
  seed, exactly as :func:`trainables.train.train` builds it (its initialisation, its ETF head);
* draws its own data order and augmentation from its own generator, in the same chunks
  (:func:`trainables.train.chunk_images`), so it sees exactly the batches it would see alone;
* has its own BatchNorm batch statistics and running statistics (its channels of the stacked buffers);
* has its own loss (CE, CB, DR), FR zeta, learning rate, momentum, cosine schedule and its timing,
  weight decay and its scope, and frozen parameters: the SGD update (PyTorch's coupled weight
  decay + momentum, the update ``torch.optim.SGD`` makes) is applied to the stack with per-model,
  per-tensor weight decay and learning rates; a tensor a model does not train (the fixed ETF
  weight, a fixed BN) gets learning rate 0 in that model and stays exactly as it was;
* has its own validation after each epoch, best-epoch selection, evaluation and artifacts: after
  every epoch its slice of the stack is copied into its own :class:`~trainables.models.Network`,
  and from there on the code is :func:`train`'s (``predict``, ``balanced_acc``, ``finish_run``).

The losses are summed over the models before the backward pass; the models share no tensor, so
each model's gradient is the gradient of its own loss. What differs from K separate runs is only
floating-point rounding: batched matrix products and reductions may sum in another order than
single ones (about 1e-7 relative per step; tests/test_fused.py bounds the difference after a few
epochs).

A model whose loss becomes NaN or infinite stops being validated and reported; the others go on
(its slice of the stack cannot affect theirs), and its entry in the returned list is the
:class:`~trainables.train.TrainingDiverged` error instead of its metrics.

Exactness: tests/test_fused.py compares fused runs with train() alone. For convolutional models in
float32 a whole run cannot be compared tightly at the tests' sizes (rounding grows chaotically: train()
alone with channels_last on and off ends 2 epochs of resnet32 0.15 apart), so whole runs are compared
in float64 (within 1.1e-9) and one step in float32 (within 1e-5 relative).

Not yet (issue #14's later steps): WB's second stage, forgetting tracking, the CUDA-graph and
torch.compile step (a fused group trains with eager steps), bf16 of the convolutional models (untested).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

from trainables.config import resolve_config
from trainables.data import LTDataset
from trainables.errors import WbsweepError
from trainables.heads import ETFClassifier
from trainables.models import BasicBlock, CifarResNet, NarrowResNet, Network, ResBlock1d
from trainables.train import (
    DeviceData,
    Knobs,
    Training,
    TrainingDiverged,
    balanced_acc,
    build_training,
    chunk_images,
    config_dataset,
    finish_run,
    has_conv,
    inject_crash,
    lr_at_epoch_start,
    pick_device,
    resume,
    save_checkpoint,
)

#: Config keys every run of a fused group must share: the data (and where it comes from), the
#: architecture, the batches' shape and count, the arithmetic, the device and the process's threads.
#: Every other key may differ between the runs (seed, lr, momentum, lr_step, select, wd, wd_scope,
#: conv_only_linear, bn, bn_scale, fr, loss, cb_beta, cb_form, classifier, etf_bias, the LA and
#: evaluation options, analyses), except those of :data:`REFUSED`.
SHARED_KEYS = ("dataset", "data_root", "rho", "val_per_class", "split", "augment", "data_fingerprint",
               "model", "width", "batch_size", "epochs", "precision", "device", "threads")

#: Options a fused run cannot do yet, with the value it needs.
REFUSED = {"stage2": False, "track_forgetting": False}

#: compile modes a fused run accepts: it trains with eager (batched) steps; "auto" is eager too.
FUSED_COMPILE = ("auto", "off")

FusedReporter = Callable[[dict[int, dict[str, Any]]], None]

#: Models whose every layer the batched forward of :class:`FusedModels` runs: the MLP family and the
#: convolutional ResNets (resnet32; resnet34 and resnext50 as NarrowResNet or torchvision's ResNet).
FUSABLE_MODELS = frozenset({"mlp3", "mlp4", "mlp5", "resblock1", "resblock2", "resnet32", "resnet34", "resnext50"})

#: Modules the batched forward runs as a whole (their children are checked by :func:`_check_supported`).
_CONV_CONTAINERS = (CifarResNet, NarrowResNet, tv_resnet.ResNet, BasicBlock, tv_resnet.BasicBlock,
                    tv_resnet.Bottleneck)
_LEAVES = (nn.Flatten, nn.ReLU, nn.Linear, ETFClassifier, nn.BatchNorm1d, nn.BatchNorm2d, nn.Conv2d, nn.MaxPool2d,
           nn.AdaptiveAvgPool2d, nn.Identity)


def check_fusable(cfgs: Sequence[dict[str, Any]]) -> None:
    """Raise WbsweepError unless the resolved configs ``cfgs`` can be trained as one fused group."""
    if not cfgs:
        raise WbsweepError("a fused group needs at least one config.")
    first = cfgs[0]
    for i, cfg in enumerate(cfgs):
        differ = [k for k in SHARED_KEYS if cfg[k] != first[k]]
        if differ:
            what = ", ".join(f"{k}={cfg[k]!r} (run 0: {first[k]!r})" for k in differ)
            raise WbsweepError(
                f"fused run {i} differs from run 0 in {what}; the runs of a fused group must share "
                f"{', '.join(SHARED_KEYS)}.")
        for key, need in REFUSED.items():
            if cfg[key] != need:
                raise WbsweepError(f"fused run {i} has {key}={cfg[key]!r}; fused training does not do that yet "
                                   f"({key} must be {need!r}): train this run alone.")
        if cfg["compile"] not in FUSED_COMPILE:
            raise WbsweepError(f"fused run {i} has compile={cfg['compile']!r}; a fused group trains with eager "
                               f"steps: use compile {' or '.join(FUSED_COMPILE)}.")


def _check_supported(m: nn.Module, name: str = "model") -> None:
    """Raise WbsweepError for a module the batched forward of :class:`FusedModels` cannot run."""
    if isinstance(m, (nn.Sequential, Network, ResBlock1d, *_CONV_CONTAINERS)):
        if isinstance(m, tv_resnet.ResNet) and not isinstance(m.fc, nn.Identity):
            raise WbsweepError(f"fused training needs torchvision's ResNet without its fc ({name}).")
        for child, sub in m.named_children():
            _check_supported(sub, f"{name}.{child}")
    elif isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.momentum is None or not m.track_running_stats):
        raise WbsweepError(f"fused training needs BatchNorm with a momentum and running statistics ({name}).")
    elif isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        raise WbsweepError(f"fused training cannot batch a convolution with padding_mode {m.padding_mode} ({name}).")
    elif isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size not in (1, (1, 1)):
        raise WbsweepError(f"fused training batches only the global average pool ({name}).")
    elif not isinstance(m, _LEAVES):
        raise WbsweepError(f"fused training cannot batch {type(m).__name__} ({name}) yet: train these runs alone.")


def _tensors(run: Training) -> dict[str, torch.Tensor]:
    """A model's parameters and buffers by name (the fixed ETF weight is a buffer)."""
    return {**dict(run.model.named_parameters()), **dict(run.model.named_buffers())}


def _per_model(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """(K,) numbers as a float32 tensor shaped (K, 1, 1, ...) to broadcast over the stacked ``like``."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


class FusedModels:
    """K models of one architecture as stacked tensors, trained with one batched step (HFTA, Wang et al.,
    MLSys 2021: horizontally fused training of K models).

    Every tensor of the K models is stacked along a new leading dimension (``stack[name]``: (K, ...)).
    Activations: (K, C, B) for the linear layers and the classifier, (B, K*C, H, W) inside a
    convolutional backbone (see the comments of the batched forward). ``runs`` are the models as
    :func:`build_training` built them (each with its optimizer groups, schedule and data generator);
    their own modules are only written to, after each epoch (:meth:`unstack`), to validate and
    evaluate them with train.py's code."""

    def __init__(self, runs: list[Training], dd: DeviceData):
        self.runs, self.dd, self.k = runs, dd, len(runs)
        self.bs = runs[0].cfg["batch_size"]
        self.knobs = runs[0].knobs
        own = [_tensors(r) for r in runs]
        names = list(own[0])
        for i, t in enumerate(own):
            shapes = {n: tuple(v.shape) for n, v in t.items()}
            if shapes != {n: tuple(v.shape) for n, v in own[0].items()}:
                raise WbsweepError(f"fused run {i} builds a model with other tensors than run 0's "
                                   f"(classifier {runs[i].cfg['classifier']}, etf_bias {runs[i].cfg['etf_bias']} vs "
                                   f"{runs[0].cfg['classifier']}, {runs[0].cfg['etf_bias']}): they cannot be stacked.")
        self.own = own
        # which tensors each model trains, with which weight decay (from its own SGD groups)
        trains: dict[str, list[bool]] = {n: [False] * self.k for n in names}
        decay: dict[str, list[float]] = {n: [0.0] * self.k for n in names}
        for i, r in enumerate(runs):
            by_id = {id(v): n for n, v in own[i].items()}
            for group in r.opt.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        trains[by_id[id(p)]][i] = True
                        decay[by_id[id(p)]][i] = float(group["weight_decay"])
        self.trained = [n for n in names if any(trains[n])]
        # contiguous (also from channels_last modules), so that a stacked conv weight (K, out, in, kh, kw)
        # is a (K*out, in, kh, kw) view, and its gradient is laid out alike
        self.stack = {n: torch.stack([t[n].detach() for t in own]).contiguous() for n in names}
        for n in self.trained:
            self.stack[n].requires_grad_(True)
        self._mask = {n: _per_model([float(x) for x in trains[n]], self.stack[n]) for n in self.trained}
        self._wd = {n: _per_model(decay[n], self.stack[n]) for n in self.trained}
        self._momentum = {n: _per_model([float(r.cfg["momentum"]) for r in runs], self.stack[n]) for n in self.trained}
        self.template = runs[0].model  # the architecture the batched forward follows (its tensors are not used)
        _check_supported(self.template)
        self.channels_last = self.knobs.channels_last and has_conv(self.template)
        self.fr = [float(r.cfg["fr"]) for r in runs]
        self._zeta = torch.tensor(self.fr, dtype=torch.float64, device=dd.device)  # cast to the loss's dtype
        self._ce = [i for i, r in enumerate(runs) if r.cfg["loss"] == "ce"]
        self._heads = [SimpleNamespace(classifier=SimpleNamespace(weight=None)) for _ in runs]
        self.chunk = chunk_images(dd, self.bs)
        self.training = True  # BatchNorm with batch statistics, updating the running ones
        # the SGD's per-model factors, broadcast to each tensor (views, no memory)
        self._params = [self.stack[n] for n in self.trained]
        self._wd_full = [self._wd[n].expand_as(self.stack[n]) for n in self.trained]
        self._mom_full = [self._momentum[n].expand_as(self.stack[n]) for n in self.trained]
        self._neg_lr: list[torch.Tensor] = []
        self._trains = trains
        # SGD's momentum buffers: a run resumed from its checkpoint brings its own (torch.optim.SGD's
        # state, zero where it has none); fresh runs have none before their first step.
        states = [[r.opt.state.get(own[i][n], {}).get("momentum_buffer") for n in self.trained]
                  for i, r in enumerate(runs)]
        self._bufs: list[torch.Tensor] | None = None
        if any(b is not None for per in states for b in per):
            self._bufs = [torch.stack([per[j] if per[j] is not None else torch.zeros_like(self.stack[n][i])
                                       for i, per in enumerate(states)]).to(self.stack[n])
                          for j, n in enumerate(self.trained)]

    # --- the batched forward ---
    # Activations are laid out (K, C, B): model, channel, image. A linear layer is then one batched
    # product W (K, out, in) @ h (K, in, B), and a BatchNorm1d of the K models is one BatchNorm of
    # K*C channels over a contiguous (1, K*C, B) view: no transposed copies forward or backward (and
    # the small classifier products are 4x faster on a CPU than in the (K, B, C) layout).

    def _linear(self, name: str, h: torch.Tensor) -> torch.Tensor:
        w, b = self.stack[f"{name}.weight"], self.stack.get(f"{name}.bias")
        if b is None:
            return torch.bmm(w, h)
        return torch.baddbmm(b.unsqueeze(2), w, h)

    def _batch_norm(self, m: nn.BatchNorm1d, name: str, h: torch.Tensor) -> torch.Tensor:
        """Train-mode BatchNorm of each model over its own batch (per-channel statistics over the
        images), the running statistics updated in place in the stacked buffers."""
        k, c, b = h.shape
        s = self.stack
        if self.training:
            s[f"{name}.num_batches_tracked"].add_(1)
        w, bias = s.get(f"{name}.weight"), s.get(f"{name}.bias")
        out = F.batch_norm(h.reshape(1, k * c, b), s[f"{name}.running_mean"].view(-1),
                           s[f"{name}.running_var"].view(-1), None if w is None else w.reshape(-1),
                           None if bias is None else bias.reshape(-1), self.training, m.momentum, m.eps)
        return out.view(k, c, b)

    def _apply(self, m: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        if isinstance(m, nn.Sequential):
            for child, sub in m.named_children():
                x = self._apply(sub, f"{name}.{child}", x)
            return x
        if isinstance(m, nn.Flatten):  # (K, B, C, H, W) images in, (K, C*H*W, B) out
            return x.flatten(2).transpose(1, 2)
        if isinstance(m, nn.ReLU):
            return F.relu(x)
        if isinstance(m, (nn.Linear, ETFClassifier)):
            return self._linear(name, x)
        if isinstance(m, nn.BatchNorm1d):
            return self._batch_norm(m, name, x)
        if isinstance(m, ResBlock1d):
            out = F.relu(self._batch_norm(m.bn1, f"{name}.bn1", self._linear(f"{name}.fc1", x)))
            return F.relu(self._batch_norm(m.bn2, f"{name}.bn2", self._linear(f"{name}.fc2", out)) + x)
        if isinstance(m, (CifarResNet, NarrowResNet, tv_resnet.ResNet)):
            return self._resnet(m, name, x)
        raise WbsweepError(f"fused training cannot batch {type(m).__name__} ({name}) yet.")

    # --- the batched forward of the convolutional models ---
    # The backbone's activations are laid out (B, K*C, H, W): image, then model-major channels. A
    # convolution of the K models is then one convolution with K times the groups: the stacked weight
    # (K, out, in/g, kh, kw) is a (K*out, in/g, kh, kw) view, and group j of model i only sees model
    # i's input channels. A BatchNorm2d of the K models is one BatchNorm of K*C channels, each
    # channel's statistics over (B, H, W) -- exactly each model's own. ReLU, max-pool, the residual
    # sums and the global average pool act per channel. After the pool, the (B, K*C) features become
    # the MLP layout (K, C, B) for the classifier and the losses.

    def _to_conv(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, Cin, H, W) images, each model its own batch -> (B, K*Cin, H, W)."""
        k, b, c, h, w = x.shape
        out = x.transpose(0, 1).reshape(b, k * c, h, w)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def _conv(self, m: nn.Conv2d, name: str, x: torch.Tensor) -> torch.Tensor:
        w, b = self.stack[f"{name}.weight"], self.stack.get(f"{name}.bias")
        return F.conv2d(x, w.view(-1, *w.shape[2:]), None if b is None else b.view(-1), m.stride, m.padding,
                        m.dilation, m.groups * self.k)

    def _bn2d(self, m: nn.BatchNorm2d, name: str, x: torch.Tensor) -> torch.Tensor:
        s = self.stack
        if self.training:
            s[f"{name}.num_batches_tracked"].add_(1)
        w, bias = s.get(f"{name}.weight"), s.get(f"{name}.bias")
        return F.batch_norm(x, s[f"{name}.running_mean"].view(-1), s[f"{name}.running_var"].view(-1),
                            None if w is None else w.view(-1), None if bias is None else bias.view(-1),
                            self.training, m.momentum, m.eps)

    def _conv_bn(self, block: nn.Module, name: str, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._bn2d(getattr(block, f"bn{i}"), f"{name}.bn{i}", self._conv(getattr(block, f"conv{i}"),
                                                                                  f"{name}.conv{i}", x))

    def _conv_module(self, m: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        """A module of a convolutional backbone on (B, K*C, H, W) activations."""
        if isinstance(m, nn.Sequential):
            for child, sub in m.named_children():
                x = self._conv_module(sub, f"{name}.{child}", x)
            return x
        if isinstance(m, nn.Conv2d):
            return self._conv(m, name, x)
        if isinstance(m, nn.BatchNorm2d):
            return self._bn2d(m, name, x)
        if isinstance(m, nn.ReLU):
            return F.relu(x)
        if isinstance(m, nn.Identity):
            return x
        if isinstance(m, nn.MaxPool2d):
            return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, BasicBlock):  # trainables.models' CIFAR block: option-A shortcut
            out = F.relu(self._conv_bn(m, name, 1, x))
            out = self._conv_bn(m, name, 2, out)
            identity = x
            if m.stride != 1 or m.pad:
                identity = x[:, :, :: m.stride, :: m.stride]
                b, _, h, w = identity.shape
                # zero channels padded per model: (B, K, C, H, W), the C dimension
                identity = F.pad(identity.reshape(b, self.k, -1, h, w),
                                 (0, 0, 0, 0, m.pad // 2, m.pad - m.pad // 2)).reshape(b, -1, h, w)
            return F.relu(out + identity)
        if isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):  # torchvision's blocks' forward
            out = F.relu(self._conv_bn(m, name, 1, x))
            out = self._conv_bn(m, name, 2, out)
            if isinstance(m, tv_resnet.Bottleneck):
                out = self._conv_bn(m, name, 3, F.relu(out))
            identity = x if m.downsample is None else self._conv_module(m.downsample, f"{name}.downsample", x)
            return F.relu(out + identity)
        raise WbsweepError(f"fused training cannot batch {type(m).__name__} ({name}) yet.")

    def _resnet(self, m: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        """The convolutional backbones: (K, B, Cin, H, W) images in, (K, d, B) features out."""
        x = self._to_conv(x)
        if isinstance(m, CifarResNet):
            x = self._conv_module(m.layers, f"{name}.layers", self._conv_module(m.stem, f"{name}.stem", x))
        else:  # NarrowResNet, torchvision's ResNet: conv1, bn1, relu, maxpool, layer1..layer4
            for child in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
                x = self._conv_module(getattr(m, child), f"{name}.{child}", x)
        return F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], self.k, -1).permute(1, 2, 0)

    def set_lr(self, lrs: Sequence[float]) -> None:
        """This epoch's learning rate of each model (0 for the tensors a model does not train)."""
        self._neg_lr = [(-_per_model(lrs, self.stack[n]) * self._mask[n]).expand_as(self.stack[n])
                        for n in self.trained]

    def losses(self, feats: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The K models' losses (K,): each its own loss (+ FR), as train()'s step computes it; the
        models with the CE loss in one call."""
        k, b, c = logits.shape
        per: list[torch.Tensor | None] = [None] * k
        ce = self._ce
        if ce:
            zc, yc = (logits, y) if len(ce) == k else (logits[ce], y[ce])
            ce_loss = F.cross_entropy(zc.reshape(-1, c), yc.reshape(-1), reduction="none").view(len(ce), b).mean(1)
            if len(ce) == k:
                per = None  # type: ignore[assignment]
                loss = ce_loss
            else:
                for j, i in enumerate(ce):
                    per[i] = ce_loss[j]
        if per is not None:
            w = self.stack.get("classifier.weight")
            for i, r in enumerate(self.runs):
                if per[i] is None:
                    self._heads[i].classifier.weight = w[i] if w is not None else None  # what the DR loss reads
                    per[i] = r.loss_fn(feats[i], logits[i], y[i], self._heads[i])
            loss = torch.stack(per)  # type: ignore[arg-type]
        if any(self.fr):  # FR: zeta/2 * mean ||g(x)||^2 (losses.feature_regularisation); + 0.0 where zeta is 0
            loss = loss + 0.5 * self._zeta.to(feats.dtype) * feats.pow(2).sum(2).mean(1)
        return loss

    @torch.no_grad()
    def predict(self, split: str, batch: int) -> torch.Tensor:
        """Every model's predicted classes (K, N) of a split, in eval mode (BatchNorm with each model's
        running statistics), left on the device: :func:`trainables.train.predict` for the K models at once."""
        self.training = False
        try:
            x, preds = self.dd.x[split], []
            for i in range(0, len(x), batch):
                xb = self.dd.prepare(x[i : i + batch], False, None)
                with self.knobs.autocast(self.dd.device):
                    h = self._apply(self.template.backbone, "backbone", xb.expand(self.k, *xb.shape))
                    preds.append(self._apply(self.template.classifier, "classifier", h).argmax(1))
            return torch.cat(preds, dim=1)
        finally:
            self.training = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K models on their batches ``x`` (K, B, ...) of normalised images, in the current mode
        (:attr:`training`: batch statistics, running statistics updated): features (K, B, d) and
        logits (K, B, classes), float32 as train()'s step has them (its loss is always float32)."""
        with self.knobs.autocast(self.dd.device):
            h = self._apply(self.template.backbone, "backbone", x)
            feats = h.transpose(1, 2)  # (K, B, d) views of the (K, d, B) activations
            logits = self._apply(self.template.classifier, "classifier", h).transpose(1, 2)
        return feats.float(), logits.float()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One SGD step of every model on its batch: ``x`` (K, B, ...) normalised images, ``y`` (K, B).
        Returns the K losses (detached)."""
        feats, logits = self.forward(x)
        loss = self.losses(feats, logits, y)
        loss.sum().backward()
        self._sgd()
        return loss.detach()

    @torch.no_grad()
    def _sgd(self) -> None:
        """torch.optim.SGD's update (coupled weight decay, momentum without dampening, the first step's
        buffer the decayed gradient), per model and tensor, a few multi-tensor ops for all tensors:
        d = g + wd * p; buf = momentum * buf + d (buf = d at the first step); p = p + (-lr) * buf."""
        params = self._params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        torch._foreach_addcmul_(grads, params, self._wd_full)
        if self._bufs is None:
            self._bufs = [g.clone() for g in grads]
        else:
            torch._foreach_mul_(self._bufs, self._mom_full)
            torch._foreach_add_(self._bufs, grads)
        torch._foreach_addcmul_(params, self._bufs, self._neg_lr)
        for p in params:
            p.grad = None

    def epoch(self, augment: bool = True) -> tuple[torch.Tensor, int]:
        """Train every model one epoch on its own batches: each draws its order and augmentation from
        its own generator, chunk by chunk, as :meth:`trainables.train.EpochRunner.epoch` does.
        Returns (the K losses summed over the epoch's images, on the device; their number)."""
        dd, bs, device = self.dd, self.bs, self.dd.device
        x_all, y_all = dd.x["train"], dd.y["train"]
        orders = []
        for r in self.runs:
            order = torch.randperm(len(x_all), device=device, generator=r.gen)
            orders.append(order[:-1] if len(order) % bs == 1 else order)  # no batch of one (BatchNorm)
        seen = len(orders[0])
        loss_sum = torch.zeros(self.k, device=device)
        for start in range(0, seen, self.chunk):
            idx = [o[start : start + self.chunk] for o in orders]
            x = torch.stack([dd.prepare(x_all[j], augment, r.gen) for j, r in zip(idx, self.runs, strict=True)])
            y = torch.stack([y_all[j] for j in idx])
            for i in range(0, len(idx[0]), bs):
                yb = y[:, i : i + bs]
                loss_sum += self.step(x[:, i : i + bs], yb) * yb.shape[1]
        for r in self.runs:
            r.opt._opt_called = True  # type: ignore[attr-defined]  # the schedule must know the model stepped
        return loss_sum, seen

    @torch.no_grad()
    def unstack(self, i: int, with_momentum: bool = False) -> None:
        """Write model ``i``'s slice of the stack into its own module; ``with_momentum``: also its
        momentum buffers into its own optimizer's state (as torch.optim.SGD keeps them), for its checkpoint."""
        for n, t in self.own[i].items():
            t.copy_(self.stack[n][i])
        run = self.runs[i]
        if not with_momentum or self._bufs is None or not run.cfg["momentum"]:
            return
        for j, n in enumerate(self.trained):
            if self._trains[n][i]:
                run.opt.state[self.own[i][n]]["momentum_buffer"] = self._bufs[j][i].clone()


def build_fused(cfgs: Sequence[dict[str, Any]], dd: DeviceData) -> FusedModels:
    """The fused group of the resolved configs ``cfgs`` (checked by :func:`check_fusable`), fresh
    (:func:`build_runs`). Raises WbsweepError for a model the batched forward cannot run."""
    return FusedModels(build_runs(cfgs, dd), dd)


def fusion_key(cfg_in: dict[str, Any], varies: Sequence[str] = ()) -> tuple[str, ...] | None:
    """What a run must share with the runs it is fused with (its :data:`SHARED_KEYS` values), or
    None when it trains alone: a model the batched forward cannot run (not in :data:`FUSABLE_MODELS`),
    an option of :data:`REFUSED`, a compile mode other than :data:`FUSED_COMPILE`, or a shared key
    among ``varies`` (the knobs a search changes from trial to trial). The sweep groups runs with
    equal keys; :func:`check_fusable` holds for any such group."""
    if cfg_in.get("stage2"):  # before resolving: a second stage resolves only with its parent's model
        return None
    cfg = resolve_config(cfg_in)
    if (cfg["model"] not in FUSABLE_MODELS or any(cfg[k] != v for k, v in REFUSED.items())
            or cfg["compile"] not in FUSED_COMPILE or set(varies) & set(SHARED_KEYS)):
        return None
    return tuple(json.dumps(cfg[k], sort_keys=True, default=str) for k in SHARED_KEYS)


def _resume(run: Training, out: Path) -> dict[str, Any]:
    """A run's progress from its own checkpoint (:func:`trainables.train.resume`: the format train()
    writes, so a fused run resumes alone or in another group, and a run of train() in a group)."""
    return resume(out, run.cfg, run.model, run.opt, run.sched, run.gen)


def train_fused(cfgs_in: Sequence[dict[str, Any]], out_dirs: Sequence[str | Path], report: FusedReporter | None = None,
                data: LTDataset | None = None, on_checkpoint: Callable[[], None] | None = None,
                ) -> list[dict[str, Any] | TrainingDiverged]:
    """Train the configs ``cfgs_in`` as one fused group and write each run's artifacts to its
    ``out_dirs`` entry, as :func:`trainables.train.train` would have written them alone.

    Returns, per run, its metrics (``train_seconds`` is its 1/K share of the group's training time,
    and ``fused_k`` = K says it was trained in a group), or the :class:`TrainingDiverged` error of a
    run whose loss became NaN (nothing is written for it). ``report(rows)`` is called once per epoch
    with ``{i: row}``, the row :func:`train` reports, for each run i still training. ``data``
    replaces the configured dataset.

    Checkpoints: every ``checkpoint_seconds`` (the group's smallest), each run's own checkpoint is
    written in train()'s format to its folder, then ``on_checkpoint()`` is called. A group started
    again resumes each run from its checkpoint; runs whose checkpoints hold different epochs (a kill
    between two of them) train as subgroups, one after the other. Raises WbsweepError for configs
    that cannot be fused (:func:`check_fusable`)."""
    cfgs = [resolve_config(c) for c in cfgs_in]
    check_fusable(cfgs)
    outs = [Path(o) for o in out_dirs]
    if len(outs) != len(cfgs) or len({o.resolve() for o in outs}) != len(outs):
        raise WbsweepError(f"a fused group of {len(cfgs)} runs needs as many distinct output folders, "
                           f"got {len(outs)} ({len({o.resolve() for o in outs})} distinct).")
    for o in outs:
        o.mkdir(parents=True, exist_ok=True)
    first = cfgs[0]
    if first["threads"]:
        torch.set_num_threads(int(first["threads"]))
    device = pick_device(first["device"])
    for cfg in cfgs:  # a knob this device cannot do fails before the data is read
        Knobs.resolve(cfg, device)
    if data is None:
        data = config_dataset(first)
    dd = DeviceData(data, device, first["augment"])
    runs = build_runs(cfgs, dd)
    progress = [_resume(r, out) for r, out in zip(runs, outs, strict=True)]
    results: list[dict[str, Any] | TrainingDiverged | None] = [None] * len(runs)
    for start in sorted({p["epoch"] for p in progress}):
        idx = [i for i, p in enumerate(progress) if p["epoch"] == start]
        def sub_report(rows: dict[int, dict[str, Any]], idx: list[int] = idx) -> None:
            if report is not None:
                report({idx[j]: row for j, row in rows.items()})

        sub = _train_epochs([runs[i] for i in idx], [outs[i] for i in idx], [progress[i] for i in idx], dd, start,
                            sub_report, on_checkpoint, k=len(runs))
        for i, r in zip(idx, sub, strict=True):
            results[i] = r
    return results  # type: ignore[return-value]


def build_runs(cfgs: Sequence[dict[str, Any]], dd: DeviceData) -> list[Training]:
    """Each run of a group built by :func:`build_training` right after seeding the global RNGs with
    its seed, as :func:`trainables.train.train` builds it."""
    runs = []
    for cfg in cfgs:
        torch.manual_seed(cfg["seed"])  # as train(): the model is initialised from the global RNG
        np.random.seed(cfg["seed"])
        # the knobs train() resolves, but eager (the fused step is): its evaluation uses the same layout
        runs.append(build_training(cfg, dd, Knobs(bool(cfg["channels_last"]), cfg["precision"], "off")))
    return runs


def _train_epochs(runs: list[Training], outs: list[Path], progress: list[dict[str, Any]], dd: DeviceData,
                  start: int, report: FusedReporter | None, on_checkpoint: Callable[[], None] | None,
                  k: int) -> list[dict[str, Any] | TrainingDiverged]:
    """Train ``runs`` (all at epoch ``start``, their ``progress`` as :func:`trainables.train.resume`
    returns it) fused to their last epoch, then evaluate and write each: the loop of train()."""
    started = time.time()
    fused = FusedModels(runs, dd)
    first, c = runs[0].cfg, dd.data.num_classes
    epochs = runs[0].epochs
    every = min(r.cfg["checkpoint_seconds"] for r in runs)
    last_save = time.time()
    diverged: dict[int, TrainingDiverged] = {}
    for epoch in range(start + 1, epochs + 1):
        lrs = [lr_at_epoch_start(r.sched, r.cfg["lr_step"]) for r in runs]
        fused.set_lr([float(r.opt.param_groups[0]["lr"]) for r in runs])
        loss_sum, seen = fused.epoch()
        for r in runs:
            if r.cfg["lr_step"] == "epoch_end":
                r.sched.step()
        val_pred = fused.predict("val", first["eval_batch_size"])
        train_losses = [s / seen for s in loss_sum.tolist()]  # the host waits for the device here, once per epoch
        rows = {}
        for i, (r, p) in enumerate(zip(runs, progress, strict=True)):
            if i in diverged:
                continue
            if not math.isfinite(train_losses[i]):
                diverged[i] = TrainingDiverged(f"loss became {train_losses[i]} at epoch {epoch}; "
                                               f"lower lr or regularisation.")
                continue
            val_acc = balanced_acc(val_pred[i], dd.y["val"], c)
            p["history"].append({"epoch": epoch, "train_loss": train_losses[i], "val_acc": val_acc, "lr": lrs[i]})
            p["epoch"] = epoch
            if r.cfg["select"] == "last" or val_acc > p["best_acc"]:
                p["best_acc"], p["best_epoch"] = val_acc, epoch
                fused.unstack(i)
                p["best_state"] = {name: v.detach().clone() for name, v in r.model.state_dict().items()}
            rows[i] = p["history"][-1]
        if epoch < epochs and time.time() - last_save >= every:
            seconds = (time.time() - started) / k
            for i, (r, p, out) in enumerate(zip(runs, progress, outs, strict=True)):
                if i not in diverged:
                    fused.unstack(i, with_momentum=True)
                    save_checkpoint(out, r.cfg, r.model, r.opt, r.sched, r.gen, p, seconds)
            if on_checkpoint is not None:
                on_checkpoint()
            last_save = time.time()
        inject_crash(*outs, epoch=epoch)
        if report is not None and rows:
            report(rows)
    trained_at = time.time()
    results: list[dict[str, Any] | TrainingDiverged] = []
    for i, (r, p, out) in enumerate(zip(runs, progress, outs, strict=True)):
        if i in diverged:
            results.append(diverged[i])
            continue
        r.model.load_state_dict(p["best_state"])
        train_seconds = p["seconds"] + (trained_at - started) / k  # with the attempts before a resume
        results.append(finish_run(out, r.cfg, r.model, dd, r.knobs, epochs=epochs, best_epoch=p["best_epoch"],
                                  history=p["history"], train_seconds=train_seconds, eval_started=time.time(),
                                  extra={"fused_k": k}))
    return results
