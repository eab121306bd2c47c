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

Nothing of a model's science is shared. Each model

* is built by :func:`trainables.train.build_training` after seeding the global RNGs with its own
  seed, exactly as :func:`trainables.train.train` builds it (its initialisation, its ETF head);
* draws its own data order and augmentation from its own generator, in the same chunks
  (:func:`trainables.device_data.chunk_images`), so it sees exactly the batches it would see alone;
* has its own BatchNorm batch statistics and running statistics (its channels of the stacked buffers);
* has its own loss (CE, CB, DR), FR zeta, learning rate, momentum, cosine schedule and its timing,
  weight decay and its scope, and frozen parameters: the SGD update (PyTorch's coupled weight
  decay + momentum, the update ``torch.optim.SGD`` makes) is applied to the stack with per-model,
  per-tensor weight decay and learning rates; a tensor a model does not train (the fixed ETF
  weight, a fixed BN) gets learning rate 0 in that model and stays exactly as it was;
* has its own validation after each epoch, best-epoch selection, evaluation and artifacts: after
  every epoch its slice of the stack is copied into its own :class:`~trainables.models.Network`,
  and from there on the code is :func:`train`'s (``predict``, ``balanced_acc``, ``finish_run``).

WB's second stage (``stage2``) is fused as the first: a group of second stages (never mixed with
first stages: ``stage2`` is a shared key, and ``epochs`` is what each run trains, its ``stage2_epochs``)
is built by :func:`build_training` as train() builds each (its parent's model loaded from
``init_from``, the classifier rows scaled to unit norm with ``stage2_init_norm``, its MaxNorm radius
from the loaded rows, the stage-2 loss and weight decay, the backbone not trained). The batched
step then runs the stacked backbone in eval mode (each model's BatchNorm with its own running
statistics, none updated: the backbone's tensors stay bit for bit its parent's), trains only the
classifier (no FR, as train()'s stage 2), and projects each model's classifier rows onto its own
MaxNorm ball after every step (``maxnorm: iter``) or every epoch (``epoch``), as
:func:`trainables.heads.apply_maxnorm_` does for one. The runs of a group may have different parents,
seeds, radii, losses, weight decays and MaxNorm timings. In a sweep, :func:`fusion_key` keys a
second stage from its config (its parent's model is not read), so a WB method's seeds are fused.

The losses are summed over the models before the backward pass; the models share no tensor, so
each model's gradient is the gradient of its own loss. What differs from K separate runs is only
floating-point rounding: batched matrix products and reductions may sum in another order than
single ones (about 1e-7 relative per step; tests/test_fused.py bounds the difference after a few
epochs). In float64 a fused run equals its run alone; in float32 the difference grows over many
epochs (SGD amplifies it chaotically: up to 2.2 pp of average accuracy after 40 epochs on
Fashion-MNIST-LT, no systematic difference), so a fused model's float32 trajectory is not the one it
would have alone. It does not depend on the other models of its group (their values never enter its
slice), but it may on the group's size and its place in it (a grouped convolution's slice at another
offset: tests/test_fused_reproduce.py), which its metrics record (``fused_k``, ``fused_slot``): a
group of K copies of it, its run at that place, reproduces it bit for bit (``wbsweep train
--config``; docs/performance.md, "What fused training preserves").

A model whose loss becomes NaN or infinite stops being validated and reported; the others go on
(its slice of the stack cannot affect theirs), and its entry in the returned list is the
:class:`~trainables.train.TrainingDiverged` error instead of its metrics.

Exactness: tests/test_fused.py compares fused runs with train() alone. For convolutional models in
float32 a whole run cannot be compared tightly at the tests' sizes (rounding grows chaotically: train()
alone with channels_last on and off ends 2 epochs of resnet32 0.15 apart), so whole runs are compared
in float64 (within 1.1e-9) and one step in float32 (within 1e-5 relative).

Checkpoints: each run writes its own, in train()'s format (:func:`train_fused`), so a group killed
mid-training resumes each run where it was, and a run may finish alone or in another group.

In a sweep, a Ray Tune trial holds a fused group when the stage graph finds several runs with the same
:func:`fusion_key` ready (``fuse`` in the spec's resources or ``--fuse``; trainables/trial.py
:func:`~trainables.trial.train_group`); every run keeps its own rows, MLflow run and folder.

The step of a group runs as the runs' ``compile`` knob says, as train()'s does
(:class:`trainables.step.CompiledStep`): eager, the batched forward and losses through torch.compile,
or the whole batched step (forward, K losses, backward, the K models' SGD update with learning rates
read from device tensors) replayed as one CUDA graph, the default on a GPU.

Forgetting events (``track_forgetting``, figure 4: Toneva et al.'s count per training image) are
counted per model from each step's logits, as train() counts them, in (K, N) tensors; each run
writes its own ``forgetting.npz`` and keeps its counts in its checkpoint.

Not yet (issue #14's later steps): bf16 of the convolutional models (untested).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainables.config import resolve_config
from trainables.data import LTDataset
from trainables.device_data import DeviceData
from trainables.errors import WbsweepError
from trainables.evaluation import balanced_acc
from trainables.run_files import inject_crash, resume, save_checkpoint
from trainables.runner import Knobs
from trainables.train import (
    Training,
    TrainingDiverged,
    build_training,
    config_dataset,
    finish_run,
    lr_at_epoch_start,
    pick_device,
)

if TYPE_CHECKING:
    from trainables.fused_model import FusedModels

#: Config keys every run of a fused group must share: the data (and where it comes from), the
#: architecture, the batches' shape and count (``epochs``: the epochs the run trains, ``stage2_epochs``
#: for a second stage, see :func:`shared_values`), which stage it is (``stage2``: a second stage trains
#: only the classifier, its backbone frozen in eval mode), the arithmetic and how the step runs
#: (``compile``: one step for the group), the device and the process's threads.
#: Every other key may differ between the runs (seed, lr, momentum, lr_step, select, wd, wd_scope,
#: conv_only_linear, bn, bn_scale, fr, loss, cb_beta, cb_form, classifier, etf_bias, the LA and
#: evaluation options, analyses, track_forgetting; for a second stage its parent (init_from,
#: parent_hash), stage2_wd, stage2_loss, maxnorm, maxnorm_alpha, stage2_init_norm).
SHARED_KEYS = ("dataset", "data_root", "rho", "val_per_class", "split", "augment", "data_fingerprint",
               "model", "width", "batch_size", "epochs", "stage2", "precision", "compile", "device", "threads")

def training_epochs(cfg: dict[str, Any]) -> int:
    """The epochs a resolved config trains: ``stage2_epochs`` for WB's second stage, else ``epochs``."""
    return int(cfg["stage2_epochs"] if cfg["stage2"] else cfg["epochs"])


def shared_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """The values of :data:`SHARED_KEYS` of a resolved config, ``epochs`` the epochs it trains
    (:func:`training_epochs`): a second stage shares its own epochs, not its parent's."""
    values = {k: cfg[k] for k in SHARED_KEYS}
    values["epochs"] = training_epochs(cfg)
    return values


FusedReporter = Callable[[dict[int, dict[str, Any]]], None]

#: Models whose every layer the batched forward of :class:`FusedModels` runs: the MLP family and the
#: convolutional ResNets (resnet32; resnet34 and resnext50 as NarrowResNet or torchvision's ResNet).
FUSABLE_MODELS = frozenset({"mlp3", "mlp4", "mlp5", "resblock1", "resblock2", "resnet32", "resnet34", "resnext50"})

def check_fusable(cfgs: Sequence[dict[str, Any]]) -> None:
    """Raise WbsweepError unless the resolved configs ``cfgs`` can be trained as one fused group."""
    if not cfgs:
        raise WbsweepError("a fused group needs at least one config.")
    first = shared_values(cfgs[0])
    for i, cfg in enumerate(cfgs):
        mine = shared_values(cfg)
        differ = [k for k in SHARED_KEYS if mine[k] != first[k]]
        if differ:
            what = ", ".join(f"{k}={mine[k]!r} (run 0: {first[k]!r})" for k in differ)
            raise WbsweepError(
                f"fused run {i} differs from run 0 in {what}; the runs of a fused group must share "
                f"{', '.join(SHARED_KEYS)} (epochs: stage2_epochs for a second stage).")


def build_fused(cfgs: Sequence[dict[str, Any]], dd: DeviceData) -> FusedModels:
    """The fused group of the resolved configs ``cfgs`` (checked by :func:`check_fusable`), fresh
    (:func:`build_runs`). Raises WbsweepError for a model the batched forward cannot run."""
    from trainables.fused_model import FusedModels  # here: it imports torchvision (seconds), which the
    # sweep's driver, importing this module for fusion_key, does not need

    return FusedModels(build_runs(cfgs, dd), dd)


#: What ``init_from`` reads when :func:`fusion_key` resolves a second stage whose parent's model
#: path is not filled in yet (the sweep's stage configs name their parent by ``parent_hash``): the
#: key never depends on the path, and nothing is loaded.
_PARENT_PLACEHOLDER = "<the parent's model.pt>"


def fusion_key(cfg_in: dict[str, Any], varies: Sequence[str] = ()) -> tuple[str, ...] | None:
    """What a run must share with the runs it is fused with (its :data:`SHARED_KEYS` values, see
    :func:`shared_values`), or None when it trains alone: a model the batched forward cannot run (not
    in :data:`FUSABLE_MODELS`), or a shared key among ``varies`` (the
    knobs a search changes from trial to trial; ``stage2_epochs`` counts as one). The sweep groups runs
    with equal keys; :func:`check_fusable` holds for any such group.

    A second stage (``stage2``) is keyed from its config alone: its parent's model is not read (it
    need not exist yet), so the seeds of a WB method, whatever their parents, get one key."""
    if cfg_in.get("stage2") and not cfg_in.get("init_from"):
        cfg_in = {**cfg_in, "init_from": _PARENT_PLACEHOLDER}
    cfg = resolve_config(cfg_in)
    if cfg["model"] not in FUSABLE_MODELS or set(varies) & {*SHARED_KEYS, "stage2_epochs"}:
        return None
    values = shared_values(cfg)
    return tuple(json.dumps(values[k], sort_keys=True, default=str) for k in SHARED_KEYS)


def _resume(run: Training, out: Path) -> dict[str, Any]:
    """A run's progress from its own checkpoint (:func:`trainables.run_files.resume`: the format train()
    writes, so a fused run resumes alone or in another group, and a run of train() in a group)."""
    return resume(out, run.cfg, run.model, run.opt, run.sched, run.gen)


def train_fused(cfgs_in: Sequence[dict[str, Any]], out_dirs: Sequence[str | Path], report: FusedReporter | None = None,
                data: LTDataset | None = None, on_checkpoint: Callable[[], None] | None = None,
                ) -> list[dict[str, Any] | TrainingDiverged]:
    """Train the configs ``cfgs_in`` as one fused group and write each run's artifacts to its
    ``out_dirs`` entry, as :func:`trainables.train.train` would have written them alone.

    Returns, per run, its metrics (``train_seconds`` is its 1/K share of the group's training time,
    ``fused_k`` = K says it was trained in a group and ``fused_slot`` its place in it: a convolutional
    model's rounding can depend on the place, see ``wbsweep train --config``), or the
    :class:`TrainingDiverged` error of a run whose loss became NaN (nothing is written for it).
    ``report(rows)`` is called once per epoch with ``{i: row}``, the row :func:`train` reports, for
    each run i still training. ``data`` replaces the configured dataset.

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
    its seed, as :func:`trainables.train.train` builds it (with the knobs train() resolves: the
    group's step runs as its first run's ``compile`` says, which all share)."""
    runs = []
    for cfg in cfgs:
        torch.manual_seed(cfg["seed"])  # as train(): the model is initialised from the global RNG
        np.random.seed(cfg["seed"])
        runs.append(build_training(cfg, dd))
    return runs


def _train_epochs(runs: list[Training], outs: list[Path], progress: list[dict[str, Any]], dd: DeviceData,
                  start: int, report: FusedReporter | None, on_checkpoint: Callable[[], None] | None,
                  k: int) -> list[dict[str, Any] | TrainingDiverged]:
    """Train ``runs`` (all at epoch ``start``, their ``progress`` as :func:`trainables.run_files.resume`
    returns it) fused to their last epoch, then evaluate and write each: the loop of train()."""
    from trainables.fused_model import FusedModels

    started = time.monotonic()  # durations: a step of the wall clock changes none of them
    fused = FusedModels(runs, dd)
    # Toneva et al.'s forgetting events, per model and training image, as train() counts them (a
    # second stage counts none): from each run's checkpoint, else from zero
    tracks = [r.cfg["track_forgetting"] and not r.stage2 for r in runs]
    if any(tracks):
        fused.track_forgetting([p.get("forgetting") if t else None for p, t in zip(progress, tracks, strict=True)])
    first, c = runs[0].cfg, dd.data.num_classes
    epochs = runs[0].epochs
    every = min(r.cfg["checkpoint_seconds"] for r in runs)
    last_save = time.monotonic()
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
        if epoch < epochs and time.monotonic() - last_save >= every:
            seconds = (time.monotonic() - started) / k
            for i, (r, p, out) in enumerate(zip(runs, progress, outs, strict=True)):
                if i not in diverged:
                    fused.unstack(i, with_momentum=True)
                    if tracks[i]:
                        p["forgetting"] = fused.forgetting_of(i)
                    save_checkpoint(out, r.cfg, r.model, r.opt, r.sched, r.gen, p, seconds)
            if on_checkpoint is not None:
                on_checkpoint()
            last_save = time.monotonic()
        inject_crash(*outs, epoch=epoch)
        if report is not None and rows:
            report(rows)
    trained_at = time.monotonic()
    results: list[dict[str, Any] | TrainingDiverged] = []
    for i, (r, p, out) in enumerate(zip(runs, progress, outs, strict=True)):
        if i in diverged:
            results.append(diverged[i])
            continue
        r.model.load_state_dict(p["best_state"])
        train_seconds = p["seconds"] + (trained_at - started) / k  # with the attempts before a resume
        if tracks[i]:  # train()'s file
            f = fused.forgetting_of(i)
            np.savez_compressed(out / "forgetting.npz", events=f["events"].cpu().numpy(),
                                ever_correct=f["ever_correct"].cpu().numpy(), labels=dd.y["train"].cpu().numpy())
        results.append(finish_run(out, r.cfg, r.model, dd, r.knobs, epochs=epochs, best_epoch=p["best_epoch"],
                                  history=p["history"], train_seconds=train_seconds, eval_started=time.monotonic(),
                                  extra={"fused_k": k, "fused_slot": i}))
    return results
