"""One training epoch, fast: the speed knobs (:class:`Knobs`), the SGD (:func:`make_sgd`) and
:class:`EpochRunner`, which trains a model one epoch at a time on device-resident data
(trainables/device_data.py).

Speed without changing the science (docs/DESIGN.md section 6, docs/performance.md):

* an epoch runs without synchronising with the host: the loss is summed on the device and read
  once, with the validation predictions, after the epoch;
* SGD is PyTorch's fused implementation (one pass over each parameter instead of four); on a CPU
  each parameter's update runs inside the backward pass;
* the knobs ``channels_last``, ``precision`` (fp32 | bf16 autocast), ``compile`` (off | torch.compile |
  a CUDA graph of the whole step) and ``eval_batch_size`` (see trainables/config.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainables.device_data import DeviceData, chunk_images
from trainables.errors import WbsweepError
from trainables.heads import apply_maxnorm_
from trainables.losses import feature_regularisation
from trainables.models import Network
from trainables.step import GRAPH_MODES, CompiledStep

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


# --- one training step, one epoch ------------------------------------------------------------


class EpochRunner(CompiledStep):
    """Trains ``model`` one epoch at a time on device-resident data, as the config says.

    An epoch: a random order of the training images (the last image is left out when it would
    form a batch of one, which train-mode BatchNorm cannot take), then per chunk of batches the
    images are gathered, augmented (:func:`~trainables.device_data.crop_flip`) and normalised with a
    few batched ops, and per batch one step: forward, loss (+ FR), backward, fused SGD, MaxNorm when
    ``maxnorm`` is "iter". MaxNorm "epoch" projects once after the epoch. Forgetting events
    (``forgetting``, the per-image state) are counted from each step's logits. The loss is summed on
    the device; :meth:`epoch` returns that sum and the number of images without waiting for the device.

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
