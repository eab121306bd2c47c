"""The batched model of fused training (trainables/fused.py): K models of one architecture as
stacked tensors, one forward/backward/SGD step for all K (HFTA, Wang et al., MLSys 2021).

Layouts: for the MLP family the activations are (K, C, B) (model, channel, image), a linear layer
one ``torch.bmm`` of the stacked weights (K, out, in) and a BatchNorm1d of the K models one
BatchNorm of K*C channels over a (1, K*C, B) view. For a convolutional backbone they are
(B, K*C, H, W): a convolution of the K models one convolution with K times the groups, a
BatchNorm2d one BatchNorm of K*C channels (each channel's statistics over (B, H, W): each model's
own), resnet32's option-A zero channels padded per model; after the global average pool the
(B, K*C) features take the MLP layout for the classifier and the losses.

``torch.func.vmap`` over ``functional_call`` computes the same and was tried for both families. For
the cpu preset's MLP it was slower than K separate models (its per-call overhead and transposed
products). For resnet32 at width 4, K = 4, batch 64, one thread, forward + backward (+ SGD for the
others), measured on this project's 2-core CPU: K separate models 229 img/s per model (channels_last,
their default) or 146 (NCHW), vmap 489 / 207 (without the SGD), the grouped convolutions 800 / 181:
the grouped convolutions with channels_last are kept. The layout follows the runs' ``channels_last``
knob (the group's first run's; the knob changes no arithmetic beyond rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

from trainables.device_data import DeviceData, chunk_images
from trainables.errors import WbsweepError
from trainables.heads import ETFClassifier
from trainables.models import BasicBlock, CifarResNet, NarrowResNet, Network, ResBlock1d
from trainables.runner import has_conv
from trainables.step import CompiledStep
from trainables.train import Training

#: Modules the batched forward runs as a whole (their children are checked by :func:`_check_supported`).
_CONV_CONTAINERS = (CifarResNet, NarrowResNet, tv_resnet.ResNet, BasicBlock, tv_resnet.BasicBlock,
                    tv_resnet.Bottleneck)
_LEAVES = (nn.Flatten, nn.ReLU, nn.Linear, ETFClassifier, nn.BatchNorm1d, nn.BatchNorm2d, nn.Conv2d, nn.MaxPool2d,
           nn.AdaptiveAvgPool2d, nn.Identity)


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


class FusedModels(CompiledStep):
    """K models of one architecture as stacked tensors, trained with one batched step (HFTA, Wang et al.,
    MLSys 2021: horizontally fused training of K models).

    The step runs as the runs' ``compile`` knob says (:class:`trainables.step.CompiledStep`: eager,
    torch.compile of the batched forward and losses, or the whole batched step as a CUDA graph).
    What changes from step to step lives in device tensors the step reads (the learning rates,
    refilled in place by :meth:`set_lr`; the momentum buffers), so a captured step stays right.

    Every tensor of the K models is stacked along a new leading dimension (``stack[name]``: (K, ...)).
    Activations: (K, C, B) for the linear layers and the classifier, (B, K*C, H, W) inside a
    convolutional backbone (see the comments of the batched forward). ``runs`` are the models as
    :func:`build_training` built them (each with its optimizer groups, schedule and data generator);
    their own modules are only written to, after each epoch (:meth:`unstack`), to validate and
    evaluate them with train.py's code.

    A group of WB second stages (:attr:`frozen_backbone`) runs its backbone in eval mode and trains
    only the classifier (the backbone's tensors have no gradient and no update), with each model's
    MaxNorm projection after each step or epoch (:meth:`_apply_maxnorm`)."""

    def __init__(self, runs: list[Training], dd: DeviceData):
        self.runs, self.dd, self.k = runs, dd, len(runs)
        self.init_step(runs[0].knobs, dd.device, runs[0].cfg["batch_size"])
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
        # WB's second stage (all runs of a group or none, trainables.fused.SHARED_KEYS): the backbone is
        # frozen in eval mode (BatchNorm with its running statistics, not updated), no FR, the stage-2
        # loss, and MaxNorm on the classifier weight (runner.py's EpochRunner, train.py's Training.runner)
        self.frozen_backbone = runs[0].stage2
        self.fr = [0.0 if r.stage2 else float(r.cfg["fr"]) for r in runs]
        self._zeta = torch.tensor(self.fr, dtype=torch.float64, device=dd.device)  # cast to the loss's dtype
        self._ce = [i for i, r in enumerate(runs) if (r.cfg["stage2_loss"] if r.stage2 else r.cfg["loss"]) == "ce"]
        self._maxnorm = {when: self._thresholds(when) for when in ("iter", "epoch")}
        self._ce_index = torch.tensor(self._ce, dtype=torch.long, device=dd.device)  # no host copy in a step
        self._heads = [SimpleNamespace(classifier=SimpleNamespace(weight=None)) for _ in runs]
        self.chunk = chunk_images(dd, self.bs)
        self.training = True  # BatchNorm with batch statistics, updating the running ones
        self.forgetting: dict[str, torch.Tensor] | None = None  # (K, N) per-image states (track_forgetting)
        # the SGD's per-model factors, broadcast to each tensor (views, no memory)
        self._params = [self.stack[n] for n in self.trained]
        self._wd_full = [self._wd[n].expand_as(self.stack[n]) for n in self.trained]
        self._mom_full = [self._momentum[n].expand_as(self.stack[n]) for n in self.trained]
        # -lr per model and tensor (0 where a model does not train it): (K, 1, ...) device tensors
        # refilled in place each epoch (set_lr), read by the step through expanded views
        self._neg_lr_k = [torch.zeros_like(self._mask[n]) for n in self.trained]
        self._neg_lr = [t.expand_as(self.stack[n]) for t, n in zip(self._neg_lr_k, self.trained, strict=True)]
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

    def _thresholds(self, when: str) -> torch.Tensor | None:
        """The MaxNorm radii (K, 1, 1) of the models projecting their classifier rows ``when``
        ("iter": after every step, "epoch": after every epoch), +inf for the others (their rows are
        multiplied by exactly 1), in the classifier weight's dtype; None when no model does."""
        want = [r.stage2 and r.cfg["maxnorm"] == when and r.threshold is not None for r in self.runs]
        if not any(want):
            return None
        radii = [float(r.threshold) if w else math.inf for r, w in zip(self.runs, want, strict=True)]
        return _per_model(radii, self.stack["classifier.weight"])

    @torch.no_grad()
    def _apply_maxnorm(self, radii: torch.Tensor) -> None:
        """:func:`trainables.heads.apply_maxnorm_` of each model's classifier weight (C, d) with its
        own radius, on the stack (K, C, d) at once and in the same operations: the factor
        min(1, radius / ||w_c||) (``radius / norms`` is ``norms.reciprocal() * radius`` in torch),
        which is exactly 1 for a model with radius +inf."""
        w = self.stack["classifier.weight"]
        factor = (w.norm(dim=2, keepdim=True).reciprocal() * radii).clamp(max=1.0)
        w.mul_(factor.to(w.dtype))

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
        if self.bn_training:
            s[f"{name}.num_batches_tracked"].add_(1)
        w, bias = s.get(f"{name}.weight"), s.get(f"{name}.bias")
        out = F.batch_norm(h.reshape(1, k * c, b), s[f"{name}.running_mean"].view(-1),
                           s[f"{name}.running_var"].view(-1), None if w is None else w.reshape(-1),
                           None if bias is None else bias.reshape(-1), self.bn_training, m.momentum, m.eps)
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
        if self.bn_training:
            s[f"{name}.num_batches_tracked"].add_(1)
        w, bias = s.get(f"{name}.weight"), s.get(f"{name}.bias")
        return F.batch_norm(x, s[f"{name}.running_mean"].view(-1), s[f"{name}.running_var"].view(-1),
                            None if w is None else w.view(-1), None if bias is None else bias.view(-1),
                            self.bn_training, m.momentum, m.eps)

    @property
    def bn_training(self) -> bool:
        """BatchNorm (only in the backbone) in train mode: batch statistics, the running ones
        updated; not while predicting, nor in a second stage (its frozen backbone in eval mode)."""
        return self.training and not self.frozen_backbone

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
        """This epoch's learning rate of each model (0 for the tensors a model does not train),
        written into the device tensors the step reads (a captured step reads the new values)."""
        for t, n in zip(self._neg_lr_k, self.trained, strict=True):
            t.copy_(-_per_model(lrs, self.stack[n]) * self._mask[n])

    def losses(self, feats: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The K models' losses (K,): each its own loss (+ FR), as train()'s step computes it; the
        models with the CE loss in one call."""
        k, b, c = logits.shape
        per: list[torch.Tensor | None] = [None] * k
        ce = self._ce
        if ce:
            zc, yc = (logits, y) if len(ce) == k else (logits.index_select(0, self._ce_index),
                                                       y.index_select(0, self._ce_index))
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
        running statistics), left on the device: :func:`trainables.evaluation.predict` for the K models at once.
        ``batch // K`` images per model at a time, ``batch`` in all: the K models' activations take
        the memory of one model's at ``batch``."""
        self.training = False
        batch = max(1, batch // self.k)
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
        (:attr:`bn_training`: batch statistics, running statistics updated): features (K, B, d) and
        logits (K, B, classes), float32 as train()'s step has them (its loss is always float32)."""
        with self.knobs.autocast(self.dd.device):
            h = self._apply(self.template.backbone, "backbone", x)
            feats = h.transpose(1, 2)  # (K, B, d) views of the (K, d, B) activations
            logits = self._apply(self.template.classifier, "classifier", h).transpose(1, 2)
        return feats.float(), logits.float()

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K models' losses (K,) on their batches, and their logits (K, B, classes): what
        torch.compile compiles."""
        feats, logits = self.forward(x)
        return self.losses(feats, logits, y), logits

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor,
                    forward: Callable) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One SGD step of every model on its batch: ``x`` (K, B, ...) normalised images, ``y`` (K, B).
        Returns the K losses (detached) and, while forgetting is tracked, whether each model's
        prediction of each of its images was right (K, B), from the logits before the update (as
        train()'s step): the static outputs of a captured step."""
        loss, logits = forward(x, y)
        loss.sum().backward()
        self._sgd()
        if self._maxnorm["iter"] is not None:  # WB's MaxNorm after every step (paper eq. 7)
            self._apply_maxnorm(self._maxnorm["iter"])
        correct = None if self.forgetting is None else logits.detach().argmax(2) == y
        return loss.detach(), correct

    def _clear_grads(self) -> None:
        for p in self._params:
            p.grad = None

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
        its own generator, chunk by chunk, as :meth:`trainables.runner.EpochRunner.epoch` does.
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
            images = torch.stack(idx) if self.forgetting is not None else None
            for i in range(0, len(idx[0]), bs):
                yb = y[:, i : i + bs]
                loss, correct = self.step(x[:, i : i + bs], yb)
                loss_sum += loss * yb.shape[1]
                if correct is not None:
                    self._count_forgetting(images[:, i : i + bs], correct)
        if self._maxnorm["epoch"] is not None:  # the authors' code: MaxNorm once after the epoch
            self._apply_maxnorm(self._maxnorm["epoch"])
        for r in self.runs:
            r.opt._opt_called = True  # type: ignore[attr-defined]  # the schedule must know the model stepped
        return loss_sum, seen

    # --- forgetting events (Toneva et al.), per model and training image ---

    def track_forgetting(self, states: Sequence[dict[str, torch.Tensor] | None]) -> None:
        """Count each model's forgetting events from now on (:meth:`trainables.runner.EpochRunner._track_forgetting`
        for the K models at once): ``states[i]`` is model i's per-image state as train() keeps it
        (``events``, ``prev_correct``, ``ever_correct``, (N,) each: fresh zeros or a checkpoint's), or
        None for a model that tracks none (counted, never read). Stacked (K, N) in :attr:`forgetting`."""
        n, device = len(self.dd.x["train"]), self.dd.device
        fresh = {"events": torch.zeros(n, dtype=torch.long, device=device),
                 "prev_correct": torch.zeros(n, dtype=torch.bool, device=device),
                 "ever_correct": torch.zeros(n, dtype=torch.bool, device=device)}
        self.forgetting = {key: torch.stack([zero if s is None else s[key].to(zero) for s in states])
                           for key, zero in fresh.items()}

    def forgetting_of(self, i: int) -> dict[str, torch.Tensor]:
        """Model ``i``'s forgetting state, (N,) tensors in train()'s form (for its checkpoint and files)."""
        assert self.forgetting is not None
        return {key: v[i].clone() for key, v in self.forgetting.items()}

    def _count_forgetting(self, images: torch.Tensor, correct: torch.Tensor) -> None:
        """A step's forgetting events: ``images`` (K, B) each model's training images, ``correct``
        (K, B) whether its prediction was right. An image forgotten (right at its previous step,
        wrong now) adds an event; the images of a batch are distinct, so gather + scatter along
        each model's row do what train()'s indexing does."""
        f = self.forgetting
        assert f is not None
        f["events"].scatter_add_(1, images, (f["prev_correct"].gather(1, images) & ~correct).long())
        f["ever_correct"].scatter_(1, images, f["ever_correct"].gather(1, images) | correct)
        f["prev_correct"].scatter_(1, images, correct)

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
