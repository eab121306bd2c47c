"""How many models to fuse: the short measurement behind ``fuse: auto`` (issue #14).

Fusing K models (trainables/fused.py) pays only where one model leaves the device idle, and it
stops paying, or runs out of memory, at a K that depends on the device, the architecture and the
batch. :func:`probe_fusion` measures it where the models will train (the sweep runs it as a Ray task
with a trial's resources, orchestrator/sweep/fusion.py):

1. **Memory.** What one more model costs: its tensors as the fused trainer holds them (its own
   module, the stacked copy, the gradient, the momentum buffer and the best epoch's copy: 5x the
   parameters and buffers), plus the activations its forward saves for the backward pass (counted
   by ``torch.autograd.graph.saved_tensors_hooks`` on one fused step of one model), plus its batch; on
   a GPU the measured peak of the allocator (``torch.cuda.max_memory_allocated`` over the fused
   steps of K models, divided by K) when that is larger. The budget is the device's free memory
   (``torch.cuda.mem_get_info``; on a CPU the system's available memory), times the trial's share of
   the device (``share``: gpus_per_trial, or cpus_per_trial over the node's cores), times
   :data:`HEADROOM`. ``k_memory`` = budget // bytes per model.
2. **Speed.** Training epochs of train()'s own single-model trainer (K = 1, the ``fuse: off``
   baseline, with the run's ``compile`` knob: the CUDA graph on a GPU) and of fused groups of
   K = 2, 4, 8, ... models (up to ``k_memory`` and ``k_max``), each model with its own order and
   augmentation as in a run, on the first :data:`PROBE_BATCHES` batches of the training set, after
   warm-up epochs (a CUDA-graph capture or a compilation happens there), timed for at least
   ``min_seconds``, best of ``rounds`` rounds taken alternately, so a busy moment slows no K alone.
   The ladder stops where K's per-model throughput falls below :data:`PAST_PEAK` x the best so far,
   or where the next K would overrun ``budget_s``.
3. **Choice.** The smallest measured K within :data:`NEAR_BEST` of the best per-model throughput
   (a smaller group at nearly the same speed leaves more trials to run side by side and wastes
   less when fewer models are ready), or 1 where even that is under :data:`MIN_GAIN` x the single
   model's throughput: fusing does not pay on this device.

The measured throughput is of training (the data's preparation on the device included; no
validation or checkpoints, which a fused group also shares); ``torch.compile`` modes are measured eagerly (compiling
each K would take longer than the runs it decides for), as the CUDA graph is not.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from trainables.config import resolve_config
from trainables.device_data import DeviceData
from trainables.errors import WbsweepError
from trainables.step import GRAPH_WARMUP_STEPS
from trainables.train import build_training, config_dataset, pick_device

#: The largest K the probe tries, per device type: a CPU's fused products saturate its cores sooner,
#: and a larger group leaves fewer trials to run side by side.
K_MAX = {"cpu": 16, "cuda": 32}
#: The probe's epoch: this many batches of the training set.
PROBE_BATCHES = 8
#: Share of the free memory a fused group may plan for (the rest: the allocator's fragmentation,
#: the CUDA context, cuDNN's workspaces, validation).
HEADROOM = 0.8
#: A K whose per-model throughput is below this fraction of the best so far ends the ladder (clearly
#: past the peak: a smaller drop may be a busy moment, which the later rounds correct).
PAST_PEAK = 0.6
#: The chosen K is the smallest within this fraction of the best per-model throughput.
NEAR_BEST = 0.95
#: Fusing is chosen only where it trains at least this many times faster per model than one model.
MIN_GAIN = 1.15


@dataclass
class FusionProbe:
    """What :func:`probe_fusion` measured and chose (JSON-able: :func:`dataclasses.asdict`)."""

    k: int  #: the chosen number of models per fused group (1: train them one per trial)
    reason: str  #: why, in one line
    device: str  #: the device's name, e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"
    img_per_s_per_model: dict[int, float] = field(default_factory=dict)  #: K -> training images/s per model
    bytes_per_model: int = 0  #: memory one more model of the group takes (see the module docstring)
    bytes_budget: int = 0  #: the memory the group may plan for
    k_memory: int = 0  #: the most models that memory holds
    seconds: float = 0.0  #: the probe's own wall time

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["img_per_s_per_model"] = {str(k): v for k, v in self.img_per_s_per_model.items()}
        return d


def available_memory(device: torch.device, share: float = 1.0) -> int:
    """Bytes the models of one trial may plan for on ``device``: the free memory (CUDA's free
    memory; on a CPU the system's MemAvailable), at most ``share`` of the total, times :data:`HEADROOM`."""
    share = min(max(float(share), 0.0), 1.0) or 1.0
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = _mem_available() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(min(free, total * share) * HEADROOM)


def _mem_available() -> int | None:
    """Linux's MemAvailable (free memory plus what the page cache can give back), in bytes."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``fn()`` runs (each storage
    counted once): the activation memory of a forward pass."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


class _Ladder:
    """One trainer of the ladder: K models (K = 1: train()'s single-model trainer), trained epochs of
    the probe's few batches exactly as a run trains (its order, augmentation and steps)."""

    def __init__(self, cfg: dict[str, Any], dd: DeviceData, k: int):
        from trainables.fused import build_fused

        self.k = k
        cfgs = [{**cfg, "seed": s} for s in range(k)]
        if k == 1:
            torch.manual_seed(0)
            self.trainer = build_training(cfgs[0], dd).runner()
        else:
            self.trainer = build_fused(cfgs, dd)
            self.trainer.set_lr([float(cfg["lr"])] * k)

    def epochs(self, n: int) -> int:
        """Train ``n`` epochs; returns the images each model saw."""
        seen = 0
        for _ in range(n):
            loss_sum, m = self.trainer.epoch()
            seen += m
        loss_sum.sum().tolist()  # the host waits for the device, as train() does once per epoch
        return seen


def probe_fusion(cfg_in: dict[str, Any], share: float | None = None, k_max: int | None = None, min_seconds: float = 0.1,
                 rounds: int = 2, budget_s: float = 20.0, data=None) -> FusionProbe:
    """Measure how many models of the resolved-able config ``cfg_in`` to fuse here (see the module
    docstring); ``share``: this trial's share of the device (0-1]; None: all of a GPU, or the
    config's threads over the machine's cores on a CPU; ``k_max``: the largest K tried
    (a power of two; default :data:`K_MAX` of the device type); ``budget_s``: the probe's time
    (seconds, about); ``data``: the dataset in place of the config's. Raises WbsweepError for a
    config that cannot be fused."""
    from trainables.fused import check_fusable

    started = time.monotonic()  # the probe's budget: a duration
    cfg = resolve_config({**cfg_in, "stage2": False})  # a second stage's model is its parent's architecture
    # torch.compile'd steps are timed without it (compiling each K would take longer than the runs it decides for)
    cfg["compile"] = {"torch": "off", "cudagraph+torch": "cudagraph"}.get(cfg["compile"], cfg["compile"])
    check_fusable([cfg])
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    device = pick_device(cfg["device"])
    if data is None:
        data = config_dataset(cfg)
    bs = int(cfg["batch_size"])
    if len(data.y_train) < bs:
        raise WbsweepError(f"the probe needs a batch of {bs} training images; the dataset has {len(data.y_train)}.")
    n = min(len(data.y_train), PROBE_BATCHES * bs)  # an epoch of the probe: the first n training images
    dd = DeviceData(dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n]), device,
                    cfg["augment"])
    k_max = K_MAX.get(device.type, 16) if k_max is None else k_max
    ks = [1] + [2 ** i for i in range(1, int(math.log2(max(k_max, 1))) + 1)]
    if share is None:
        share = 1.0 if device.type == "cuda" else min(1.0, max(1, int(cfg["threads"] or 1)) / (os.cpu_count() or 1))
    budget = available_memory(device, share)
    per_model = _bytes_per_model(cfg, dd)
    k_memory = max(1, budget // per_model)

    rates: dict[int, float] = {}
    ladders: list[_Ladder] = []
    k_epoch_s = 0.0
    warmup = 1 + -(-(GRAPH_WARMUP_STEPS + 2) // PROBE_BATCHES)  # epochs: a capture or compilation happens here
    for k in ks:
        if k > k_memory:
            break
        if rates and time.monotonic() - started + 3 * rounds * max(min_seconds, 2 * k_epoch_s) > budget_s:
            break
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        try:
            ladder = _Ladder(cfg, dd, k)
            ladder.epochs(warmup)  # ends with a host read: the device has finished
        except torch.OutOfMemoryError:
            k_memory = max(1, k // 2)
            break
        if device.type == "cuda" and k > 1:
            measured = (torch.cuda.max_memory_allocated(device) - base) // k
            if measured > per_model:
                per_model = int(measured)
                k_memory = max(1, budget // per_model)
        if device.type == "cuda":  # a GPU is not shared: the rounds at once, and its memory freed for the next K
            rates[k] = max(_per_model_rate(ladder, min_seconds) for _ in range(rounds))
            del ladder
            torch.cuda.empty_cache()
        else:  # a CPU's other work comes and goes: the rounds alternate between the Ks (below)
            rates[k] = _per_model_rate(ladder, min_seconds)
            ladders.append(ladder)
        k_epoch_s = k * len(dd.y["train"]) / rates[k]
        if rates[k] < PAST_PEAK * max(rates.values()):
            break
    for _ in range(rounds - 1):  # the other rounds, alternately: best of the rounds
        for ladder in ladders:
            rates[ladder.k] = max(rates[ladder.k], _per_model_rate(ladder, min_seconds))
    rates = {k_: r for k_, r in rates.items() if k_ <= k_memory}  # a larger K ran, but without headroom
    k, reason = choose_k(rates, k_memory)
    return FusionProbe(k=k, reason=reason, device=_device_name(device),
                       img_per_s_per_model={k_: round(r, 1) for k_, r in rates.items()},
                       bytes_per_model=int(per_model), bytes_budget=int(budget), k_memory=int(k_memory),
                       seconds=round(time.monotonic() - started, 2))


def choose_k(rates: dict[int, float], k_memory: int) -> tuple[int, str]:
    """The K to fuse from the measured per-model throughputs ``rates`` (K -> images/s per model,
    K = 1 among them: the single-model trainer) and the most models memory holds: the smallest K
    within :data:`NEAR_BEST` of the best, or 1 where that K is under :data:`MIN_GAIN` x K = 1's.
    Returns (K, why in one line)."""
    if 1 not in rates:
        raise WbsweepError("choose_k needs the single model's throughput (K = 1).")
    best = max(rates.values())
    k = min(k_ for k_, r in rates.items() if r >= NEAR_BEST * best)
    gain = rates[k] / rates[1]
    if k == 1:
        return 1, "fusing does not pay here: one model per trial trains fastest"
    if gain < MIN_GAIN:
        return 1, f"fusing does not pay here: {gain:.2f}x per model at K={k} (fusing needs {MIN_GAIN}x)"
    held = f"; memory holds {k_memory}" if k == max(rates) and k * 2 > k_memory else ""
    return k, f"{gain:.2f}x the single model's throughput per model at K={k}{held}"


def _bytes_per_model(cfg: dict[str, Any], dd: DeviceData) -> int:
    """One more model's memory in a fused group (module docstring, 1.): 5x its tensors, the
    activations one fused step of it saves, its batch as float32."""
    from trainables.fused import build_fused

    group = build_fused([{**cfg, "seed": 0}], dd)
    bs = int(cfg["batch_size"])
    x = dd.prepare(dd.x["train"][:bs], False, None).unsqueeze(0)
    state = sum(t.numel() * t.element_size() for t in group.stack.values())
    saved = saved_activation_bytes(lambda: group._forward_loss(x, dd.y["train"][:bs].unsqueeze(0)))
    return int(5 * state + saved + x.numel() * x.element_size())


def _per_model_rate(ladder: _Ladder, min_seconds: float) -> float:
    """Training images per second per model of ``ladder``: epochs in doubling blocks until a block
    takes ``min_seconds``."""
    n = 1
    while True:
        t0 = time.perf_counter()
        seen = ladder.epochs(n)
        dt = time.perf_counter() - t0
        if dt >= min_seconds or n >= 1024:
            return ladder.k * seen / dt
        n *= 2


def probe_task(cfg: dict[str, Any], share: float | None) -> dict[str, Any]:
    """:func:`probe_fusion` as the sweep's Ray task runs it: the probe as a dict (:meth:`FusionProbe.as_dict`)."""
    return probe_fusion(cfg, share).as_dict()
