"""Fused training (trainables/fused.py): K runs trained as one vmapped model write what each run
writes when trained alone by train(), to float32 rounding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from trainables.config import resolve_config
from trainables.errors import WbsweepError
from trainables.fused import train_fused
from trainables.train import train

BASE = {"dataset": "digits-lt", "model": "mlp3", "width": 32, "epochs": 3, "threads": 1, "device": "cpu",
        "lr": 0.05, "checkpoint_seconds": 1e9}
#: different seeds, methods, losses, heads, weight-decay scopes, schedules and selections in one group
GROUP = [
    {**BASE, "seed": 0},  # naive: CE, linear head, no WD
    {**BASE, "seed": 1, "wd": 5e-3, "fr": 1e-3, "classifier": "etf", "lr_step": "epoch_start"},  # WD&FR&ETF
    {**BASE, "seed": 2, "loss": "cb", "wd": 1e-3, "wd_scope": "no_bn_shift", "bn": "fixed", "bn_scale": 0.5,
     "select": "last", "lr": 0.02, "momentum": 0.8},  # CB, frozen BN, another lr and momentum
    {**BASE, "seed": 3, "loss": "dr", "classifier": "etf", "wd": 5e-3, "wd_scope": "conv_only"},  # WD&ETF&DR
]

# Tolerances. The fused step computes the same operations as train()'s, but its matrix products are
# batched over the models (vmap -> bmm), which sums in another order: each step differs by float32
# rounding (~1e-7 relative), and a few dozen steps of SGD carry that forward without amplifying it
# much (measured on this group: weights within 6e-7 absolute, logits within 1.5e-6 absolute, losses
# and FDR within 1.1e-7 relative). The bounds below are ~7-20x (arrays) and ~10x (scalars) those and far
# below what another seed changes (order 1e-1). Accuracies, the chosen epoch and the LA parameters come
# from argmaxes of these logits and are compared as they are (no near-tie here flips).
WEIGHTS = {"rtol": 1e-5, "atol": 1e-5}
LOGITS = {"rtol": 1e-5, "atol": 1e-5}
SCALARS = {"rtol": 1e-5, "atol": 1e-6}
TIMING = {"train_seconds", "eval_seconds", "node", "fused_k", "fused_slot"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("fused")
    rows: list[tuple[int, dict[str, Any]]] = []
    fused = train_fused(GROUP, [root / f"fused{i}" for i in range(len(GROUP))],
                        report=lambda epoch_rows: rows.extend(epoch_rows.items()))
    alone = [train(cfg, root / f"alone{i}") for i, cfg in enumerate(GROUP)]
    torch.set_num_threads(threads)
    return {"root": root, "fused": fused, "alone": alone, "rows": rows}


def model_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["model"]


def assert_same_run(fused: Path, alone: Path) -> None:
    a, b = model_state(fused), model_state(alone)
    assert a.keys() == b.keys()
    for name in a:
        assert_close(a[name], b[name], **WEIGHTS, msg=lambda m, n=name: f"{n}: {m}")
    la, lb = np.load(fused / "logits.npz"), np.load(alone / "logits.npz")
    assert la.files == lb.files
    for key in la.files:
        assert_close(torch.from_numpy(la[key]), torch.from_numpy(lb[key]), **LOGITS)
    assert json.loads((fused / "config.json").read_text()) == json.loads((alone / "config.json").read_text())


@pytest.mark.parametrize("i", range(len(GROUP)))
def test_fused_run_writes_what_it_writes_alone(runs: dict[str, Any], i: int) -> None:
    fused, alone = runs["root"] / f"fused{i}", runs["root"] / f"alone{i}"
    assert sorted(p.name for p in fused.iterdir()) == sorted(p.name for p in alone.iterdir())
    assert_same_run(fused, alone)


@pytest.mark.parametrize("i", range(len(GROUP)))
def test_fused_metrics_equal_alone(runs: dict[str, Any], i: int) -> None:
    fm, am = runs["fused"][i], runs["alone"][i]
    assert fm["fused_k"] == len(GROUP)
    assert set(fm) - TIMING == set(am) - TIMING
    on_disk = json.loads((runs["root"] / f"fused{i}" / "metrics.json").read_text())
    assert on_disk["best_epoch"] == fm["best_epoch"]
    assert fm["best_epoch"] == am["best_epoch"]  # the same epoch chosen
    assert fm["config_hash"] == am["config_hash"] and fm["seed"] == am["seed"]
    for h, g in zip(fm["history"], am["history"], strict=True):
        assert h["epoch"] == g["epoch"] and h["lr"] == g["lr"] and h["val_acc"] == g["val_acc"]
        assert_close(h["train_loss"], g["train_loss"], **SCALARS)
    for key in ("fdr_train", "fdr_test", "objective"):
        assert_close(fm[key], am[key], **SCALARS)
    # every post-hoc LA variant: the same tau/gamma chosen, the same accuracies
    assert fm["la"].keys() == am["la"].keys()
    for la in fm["la"]:
        for key, value in am["la"][la].items():
            assert_close(fm["la"][la][key], value, **SCALARS, msg=lambda m, k=key, v=la: f"la {v} {k}: {m}")


def test_fused_reports_each_run_every_epoch(runs: dict[str, Any]) -> None:
    for i, am in enumerate(runs["alone"]):
        rows = [row for j, row in runs["rows"] if j == i]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert [r["val_acc"] for r in rows] == [h["val_acc"] for h in am["history"]]


def test_another_seed_breaks_the_equality(runs: dict[str, Any], tmp_path: Path) -> None:
    """The comparison can fail: model 1 trained with another seed differs from model 1 alone, and
    the other models of its group are unaffected by the change."""
    group = [dict(c) for c in GROUP]
    group[1]["seed"] = 7
    outs = [tmp_path / f"f{i}" for i in range(len(group))]
    train_fused(group, outs)
    with pytest.raises(AssertionError):
        assert_same_run(outs[1], runs["root"] / "alone1")
    for i in (0, 2, 3):
        assert_same_run(outs[i], runs["root"] / f"alone{i}")


def test_one_seed_twice_in_a_group_gives_its_run_twice(runs: dict[str, Any], tmp_path: Path) -> None:
    """Each model draws from its own generator: two runs of one seed in a group both equal the run
    trained alone (with a generator shared by the group the second would see other batches)."""
    group = [GROUP[0], {**GROUP[0], "lr": GROUP[0]["lr"]}]
    outs = [tmp_path / "a", tmp_path / "b"]
    train_fused(group, outs)
    for out in outs:
        assert_same_run(out, runs["root"] / "alone0")


@pytest.mark.parametrize(("change", "message"), [
    ({"width": 16}, "width"),
    ({"batch_size": 32}, "batch_size"),
    ({"epochs": 2}, "epochs"),
    ({"stage2": True, "init_from": "x.pt"}, "stage2"),  # never with first stages (tests/test_fused_stage2.py)
    ({"compile": "torch"}, "compile"),  # one step for the group: it runs one way
])
def test_unfusable_groups_are_refused(change: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(WbsweepError, match=message):
        train_fused([GROUP[0], {**GROUP[0], **change}], [tmp_path / "a", tmp_path / "b"])


def group_on_cpu(cfgs: list[dict[str, Any]]):
    """The fused group of ``cfgs`` (resolved) on the CPU, its learning rates set: (group, configs)."""
    from trainables.device_data import DeviceData
    from trainables.fused import build_fused
    from trainables.train import config_dataset

    resolved = [resolve_config(c) for c in cfgs]
    group = build_fused(resolved, DeviceData(config_dataset(resolved[0]), torch.device("cpu"), "auto"))
    group.set_lr([c["lr"] for c in resolved])
    return group, resolved


def test_the_fused_step_reads_its_learning_rates_from_tensors_refilled_in_place() -> None:
    """What a CUDA graph of the fused step needs (it replays the kernels on the addresses it
    recorded): set_lr writes each epoch's rates into the same device tensors, which the step reads."""
    group, cfgs = group_on_cpu(GROUP)
    tensors = [(t.data_ptr(), v.data_ptr()) for t, v in zip(group._neg_lr_k, group._neg_lr, strict=True)]
    group.set_lr([0.2, 0.0, 0.3, 0.4])
    assert [(t.data_ptr(), v.data_ptr()) for t, v in zip(group._neg_lr_k, group._neg_lr, strict=True)] == tensors
    j = group.trained.index("backbone.1.weight")
    assert group._neg_lr[j][:, 0, 0].tolist() == pytest.approx([-0.2, 0.0, -0.3, -0.4])
    before = {n: v.detach().clone() for n, v in group.stack.items()}
    group.epoch()
    changed = [not torch.equal(before["backbone.1.weight"][i], group.stack["backbone.1.weight"][i]) for i in range(4)]
    assert changed == [True, False, True, True]  # the model at learning rate 0 did not move


def test_no_host_reads_inside_a_fused_epoch(monkeypatch: pytest.MonkeyPatch, forbid_host_reads) -> None:
    """A fused epoch of CE, CB and DR models with FR never reads a tensor's value on the host (on a
    GPU each read would wait for the device, and none may happen inside a captured step)."""
    group, _ = group_on_cpu(GROUP)
    forbid_host_reads()
    loss_sum, seen = group.epoch()
    monkeypatch.undo()
    assert seen > 0 and all(np.isfinite(loss_sum.tolist()))


@pytest.mark.slow
def test_torch_compile_of_the_fused_step_trains_as_the_eager_step() -> None:
    """compile=torch: the batched forward and the K losses (CE, CB, DR with the ETF head, FR) through
    torch.compile train an epoch as the eager step does, to float32 rounding. Slow: ~20 s of
    compiling on two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager, _ = group_on_cpu([{**c, "compile": "off"} for c in GROUP])
        compiled, _ = group_on_cpu([{**c, "compile": "torch"} for c in GROUP])
        losses = [g.epoch()[0] for g in (eager, compiled)]
    finally:
        torch.set_num_threads(threads)
    assert compiled._compiled_ran and eager._compiled is None
    assert_close(losses[1], losses[0], **SCALARS)
    for name, value in eager.stack.items():
        assert_close(compiled.stack[name], value, **WEIGHTS, msg=lambda m, n=name: f"{n}: {m}")


def test_conv_models_and_mismatched_heads_are_refused(tmp_path: Path) -> None:
    """(Convolutional models are fused since issue #14's conv step: see the tests at the end.)"""
    with pytest.raises(WbsweepError, match="other tensors"):
        train_fused([GROUP[1], {**GROUP[1], "etf_bias": False}], [tmp_path / "c", tmp_path / "d"])
    with pytest.raises(WbsweepError, match="distinct output folders"):
        train_fused(GROUP[:2], [tmp_path / "e", tmp_path / "e"])
    assert resolve_config(GROUP[0])  # the group itself is valid


def test_resblock_with_augmentation_equals_alone(tmp_path: Path) -> None:
    """The other MLP family (residual blocks) and per-model crop+flip draws from each model's generator."""
    base = {**BASE, "model": "resblock1", "width": 16, "epochs": 2, "augment": "crop_flip"}
    group = [{**base, "seed": 4}, {**base, "seed": 5, "wd": 5e-3, "classifier": "etf", "fr": 1e-3}]
    threads = torch.get_num_threads()
    train_fused(group, [tmp_path / f"f{i}" for i in range(2)])
    for i, cfg in enumerate(group):
        train(cfg, tmp_path / f"a{i}")
        assert_same_run(tmp_path / f"f{i}", tmp_path / f"a{i}")
    torch.set_num_threads(threads)


def test_bench_fused_reports_its_figures() -> None:
    from orchestrator.bench.command import fused

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = fused("cpu", "mlp3", k=2, width=16, rounds=1, log=lambda msg: None)
    finally:
        torch.set_num_threads(threads)
    assert result["fused_k"] == 2
    for key in ("fused_img_per_s_per_model", "sequential_img_per_s_per_model", "fused_speedup"):
        assert result[key] > 0
    torch.set_num_threads(1)
    try:  # a convolutional model too (digits-lt: 8x8 images)
        conv = fused("cpu", "resnet32", k=2, width=4, rounds=1, log=lambda msg: None)
    finally:
        torch.set_num_threads(threads)
    assert conv["model"] == "resnet32" and conv["fused_speedup"] > 0


def test_a_diverging_run_does_not_stop_the_others(runs: dict[str, Any], tmp_path: Path) -> None:
    from trainables.run_files import load_metrics
    from trainables.train import TrainingDiverged

    group = [GROUP[0], {**GROUP[0], "seed": 9, "lr": 1.0e6}]
    result = train_fused(group, [tmp_path / "ok", tmp_path / "nan"])
    assert isinstance(result[1], TrainingDiverged) and "epoch 1" in str(result[1])
    assert load_metrics(tmp_path / "nan") is None and not (tmp_path / "nan" / "model.pt").exists()
    assert_same_run(tmp_path / "ok", runs["root"] / "alone0")


def test_a_killed_group_resumes_each_run_from_its_checkpoint(runs: dict[str, Any], tmp_path: Path,
                                                            crash_fused_group) -> None:
    """The process dies at the end of epoch 2 (after every run's checkpoint); one run's checkpoint is
    then removed (a kill between two checkpoint writes): started again, the group resumes three runs
    at epoch 2 and trains the fourth from the start, and every run ends as it does trained alone."""
    group = [{**cfg, "checkpoint_seconds": 0} for cfg in GROUP]
    outs = [tmp_path / f"seed{cfg['seed']}" for cfg in group]  # inject_crash names runs by their folder
    crash_fused_group(group, outs, epoch=2, seeds="1")
    for out in outs:
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state["epoch"] == 2 and not (out / "metrics.json").exists()
    (outs[2] / "checkpoint.pt").unlink()
    rows: list[tuple[int, dict[str, Any]]] = []
    results = train_fused(group, outs, report=lambda epoch_rows: rows.extend(epoch_rows.items()))
    assert sorted((i, r["epoch"]) for i, r in rows) == sorted([(i, 3) for i in (0, 1, 3)] + [(2, e) for e in (1, 2, 3)])
    for i, out in enumerate(outs):
        assert not (out / "checkpoint.pt").exists()
        alone = runs["root"] / f"alone{i}"
        a, b = model_state(out), model_state(alone)
        for name in a:
            assert_close(a[name], b[name], **WEIGHTS, msg=lambda m, n=name, i=i: f"run {i} {n}: {m}")
        la, lb = np.load(out / "logits.npz"), np.load(alone / "logits.npz")
        for key in la.files:
            assert_close(torch.from_numpy(la[key]), torch.from_numpy(lb[key]), **LOGITS)
        mine, theirs = results[i], runs["alone"][i]
        assert mine["best_epoch"] == theirs["best_epoch"]
        assert [h["epoch"] for h in mine["history"]] == [1, 2, 3]
        for h, g in zip(mine["history"], theirs["history"], strict=True):
            assert h["val_acc"] == g["val_acc"]
            assert h["train_loss"] == pytest.approx(g["train_loss"], rel=1e-5)


def test_a_fused_checkpoint_resumes_alone(runs: dict[str, Any], tmp_path: Path, crash_fused_group) -> None:
    """A fused run's checkpoint is train()'s: a run killed in a group may be finished alone."""
    group = [{**cfg, "checkpoint_seconds": 0} for cfg in GROUP[:2]]
    outs = [tmp_path / "a", tmp_path / "b"]
    crash_fused_group(group, outs, epoch=1)
    metrics = train(group[1], outs[1])  # momentum buffers and schedule continue where the group left them
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    a, b = model_state(outs[1]), model_state(runs["root"] / "alone1")
    for name in a:
        assert_close(a[name], b[name], **WEIGHTS, msg=lambda m, n=name: f"{n}: {m}")


# --- convolutional models (resnet32's option-A blocks, torchvision's BasicBlock / Bottleneck) ---------------------
#
# A convolutional group runs as one grouped convolution per layer (trainables/fused.py). Its exactness is
# tested in float64, where rounding is ~1e-16: at the float32 sizes of these CPU tests, the runs with a
# trained linear head amplify rounding chaotically (train() alone with channels_last on vs off -- the same
# math -- ends 2 epochs of resnet32 width 4 on digits-lt with weights 0.15 apart, the fused run 0.07 from
# it), so a float32 comparison of whole runs could not tell a bug from rounding. In float64 the fused runs
# end within 1.1e-9 of the runs alone (measured, weights and logits; the worst run is resnet34's
# linear-head run, ~1e-13 for the others) and another seed changes them by ~1e-1.

WEIGHTS64 = {"rtol": 1e-7, "atol": 1e-7}
SCALARS64 = {"rtol": 1e-9, "atol": 1e-12}


def conv_group(model: str, width: int, **extra: Any) -> list[dict[str, Any]]:
    """GROUP's four methods (naive; WD&FR&ETF; CB with fixed BN; DR&ETF) for a convolutional model."""
    return [{**cfg, "model": model, "width": width, "epochs": 2, **extra} for cfg in GROUP]


@pytest.mark.parametrize(("model", "width", "augment"), [("resnet32", 4, "crop_flip"), ("resnet34", 2, "auto")])
def test_conv_group_equals_alone_in_float64(float64: None, model: str, width: int, augment: str,
                                            tmp_path: Path) -> None:
    """Whole runs (2 epochs of digits-lt, 8x8 images; per-model data order and crop+flip draws, BN
    statistics, SGD with per-model lr/momentum/WD and its scope, frozen BN, schedules, selection,
    evaluation and LA): resnet32 (option-A shortcuts) and resnet34 as NarrowResNet (torchvision's
    BasicBlock, conv1x1+BN downsample)."""
    group = conv_group(model, width, augment=augment)
    fused = train_fused(group, [tmp_path / f"f{i}" for i in range(len(group))])
    for i, cfg in enumerate(group):
        alone = train(cfg, tmp_path / f"a{i}")
        fm, am = fused[i], alone
        assert fm["best_epoch"] == am["best_epoch"]
        for h, g in zip(fm["history"], am["history"], strict=True):
            assert h["val_acc"] == g["val_acc"]
            assert_close(h["train_loss"], g["train_loss"], **SCALARS64)
        assert_close(fm["objective"], am["objective"], **SCALARS64)
        for key in ("fdr_train", "fdr_test"):  # a ratio of scatter matrices (an inverse) amplifies the
            # float64 rounding: 1.08e-9 relative seen for resnet34 on one machine's CPU
            assert_close(fm[key], am[key], rtol=1e-8, atol=0)
        a, b = model_state(tmp_path / f"f{i}"), model_state(tmp_path / f"a{i}")
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype
            assert_close(a[name], b[name], **WEIGHTS64, msg=lambda m, n=name, i=i: f"run {i} {n}: {m}")
        la, lb = np.load(tmp_path / f"f{i}" / "logits.npz"), np.load(tmp_path / f"a{i}" / "logits.npz")
        assert la["test_logits"].dtype == np.float64  # the comparison is a float64 one
        for key in la.files:
            assert_close(torch.from_numpy(la[key]), torch.from_numpy(lb[key]), **WEIGHTS64)
    # the comparison can fail: another seed for run 1 changes it far beyond the tolerance
    other = [{**group[1], "seed": 7}]
    train_fused(other, [tmp_path / "other"])
    a, b = model_state(tmp_path / "other"), model_state(tmp_path / "a1")
    assert max(float((a[n] - b[n]).abs().max()) for n in a if a[n].is_floating_point()) > 1e-2


def one_step_data(channels: int, size: int, n: int = 32) -> Any:
    """A tiny LTDataset of random images (10 classes) of ``channels`` x ``size`` x ``size``."""
    from trainables.data import LTDataset

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 10

    def images(k: int) -> torch.Tensor:
        return torch.randint(0, 256, (k, channels, size, size), dtype=torch.uint8, generator=gen)

    return LTDataset(name="tiny", x_train=images(n), y_train=y, x_val=images(10), y_val=torch.arange(10),
                     x_test=images(10), y_test=torch.arange(10), num_classes=10, class_counts=[n // 10] * 10,
                     mean=(0.5,) * channels, std=(0.25,) * channels, augment="none", many_threshold=100,
                     few_threshold=20)


def one_step(model: str, width: int, channels: int, size: int, channels_last: bool) -> float:
    """The largest difference of a training-mode forward and backward of a fused group of 3 from each
    model's own (logits, every gradient, BN running statistics), relative to the largest value of each."""
    from trainables.device_data import DeviceData
    from trainables.fused import build_runs
    from trainables.fused_model import FusedModels
    from trainables.losses import feature_regularisation

    data = one_step_data(channels, size)
    dd = DeviceData(data, torch.device("cpu"), "none")
    group = [{**cfg, "model": model, "width": width, "channels_last": channels_last} for cfg in GROUP[:4]]
    runs = build_runs([resolve_config(c) for c in group], dd)
    fm = FusedModels(runs, dd)
    x = torch.stack([dd.prepare(data.x_train[i::4][:8], False, None) for i in range(len(runs))])
    y = torch.stack([data.y_train[i::4][:8] for i in range(len(runs))])
    feats, logits = fm.forward(x)
    fm.losses(feats, logits, y).sum().backward()
    worst = 0.0
    for i, r in enumerate(runs):
        r.model.train()
        xi = x[i].contiguous(memory_format=torch.channels_last) if channels_last else x[i]
        f = r.model.backbone(xi)
        z = r.model.classifier(f)
        loss = r.loss_fn(f, z, y[i], r.model)
        if r.cfg["fr"]:
            loss = loss + feature_regularisation(f, r.cfg["fr"])
        loss.backward()
        pairs = [(logits[i], z)]
        pairs += [(fm.stack[n].grad[i], p.grad) for n, p in r.model.named_parameters() if p.grad is not None]
        pairs += [(fm.stack[n][i], b) for n, b in r.model.named_buffers() if "running" in n]
        assert len(pairs) > 10
        for got, want in pairs:
            scale = max(float(want.detach().abs().max()), 1e-30)
            worst = max(worst, float((got.detach() - want.detach()).abs().max()) / scale)
    return worst


CONV_CASES = [
    ("resnet32", 4, 1, 8),  # trainables.models' CIFAR ResNet: option-A shortcuts (strided + zero channels)
    ("resnet34", 2, 1, 8),  # NarrowResNet, torchvision's BasicBlock with conv1x1 + BN downsample
    ("resnext50", 16, 1, 8),  # NarrowResNet, torchvision's Bottleneck with 32 groups
    ("resnet34", 2, 3, 64),  # the ImageNet stem: 7x7 stride 2 and the max-pool
]


@pytest.mark.parametrize(("model", "width", "channels", "size"), CONV_CASES)
def test_conv_one_step_equals_alone_in_float64(float64: None, model: str, width: int, channels: int,
                                               size: int) -> None:
    """One training-mode step of every convolutional layout: logits, every gradient and the BN running
    statistics of each model equal its own to float64 rounding (measured relative to each tensor's largest
    value: <= 1.5e-14, resnext50's 32-group convolutions 1.3e-12)."""
    assert one_step(model, width, channels, size, channels_last=False) < 1e-10


@pytest.mark.slow  # ~10 s: torchvision's resnet34 itself (21M parameters) at 8x8 images
def test_torchvision_resnet_one_step_equals_alone_in_float64(float64: None) -> None:
    """Width 64: the paper presets' torchvision ResNet (its module layout, fc = Identity)."""
    assert one_step("resnet34", 64, 3, 8, channels_last=False) < 1e-10  # measured 3.8e-15


@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_one_step_equals_alone_in_float32(channels_last: bool) -> None:
    """The float32 step as it trains (channels_last on by default): each model's logits, gradients
    and statistics within float32 rounding of its own (measured relative to each tensor's largest value:
    9.2e-6 with channels_last, 2.6e-6 without; one model's own float32 gradients are ~3e-5 from its
    float64 ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert one_step("resnet32", 4, 1, 8, channels_last) < 2e-4
    finally:
        torch.set_num_threads(threads)


def test_gpu_fused_check_runs_on_a_cpu() -> None:
    """bench/gpu_fused_check.py (the GPU script's Python part) at a toy size: every figure it reports."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_fused_check.py"
    spec = importlib.util.spec_from_file_location("gpu_fused_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = module.main(["--device", "cpu", "--models", "resnet32", "--width", "2", "--ks", "1,2", "--images", "64",
                           "--variants", "graph", "--no-probe"])  # the probe: tests/test_fuse_probe.py
    finally:
        torch.set_num_threads(threads)
    assert out["failures"] == []
    row = out["models"]["resnet32"]
    assert "auto_probe" not in row
    assert row["single"]["default_knobs"] > 0 and row["single"]["eager"] > 0
    rates = row["fused"]["graph"]
    assert set(rates) == {"1", "2"} and all(v > 0 for v in rates.values())
    assert row["best"]["k"] in (1, 2) and row["ratio_to_k1"]["graph"]["1"] == 1.0
    best = row["best"]["img_per_s_per_model"]
    assert row["best"]["table4_gpu_minutes"] == pytest.approx(30 * 320 * 10847 / best / 60, rel=1e-3)
    json.dumps(out)  # what the shell script prints


def test_conv_runs_are_fused_by_the_sweep() -> None:
    """fusion_key groups convolutional runs as the MLPs' (their shared keys), and still keeps apart
    what cannot be fused."""
    from trainables.fused import fusion_key

    conv = {"dataset": "cifar100-lt", "model": "resnet32", "seed": 0, "wd": 5e-3}
    assert fusion_key(conv) is not None
    assert fusion_key(conv) == fusion_key({**conv, "seed": 1, "loss": "cb", "channels_last": False})
    assert fusion_key(conv) != fusion_key({**conv, "width": 8})
    assert fusion_key({**conv, "model": "resnext50"}) is not None
    assert fusion_key({**conv, "track_forgetting": True}) == fusion_key(conv)  # counted per model
    assert fusion_key({**conv, "compile": "torch"}) not in (None, fusion_key(conv))  # another step


# --- forgetting events (track_forgetting, figure 4) ---------------------------------------------------------------

#: runs 0 and 2 count forgetting events, run 1 does not (a group may mix them)
FORGETTING = [{**GROUP[0], "track_forgetting": True}, GROUP[1], {**GROUP[2], "track_forgetting": True,
                                                                 "analyses": ["forgetting"]}]


def assert_same_forgetting(fused: Path, alone: Path) -> None:
    """forgetting.npz as train() writes it: the same arrays, exactly (integer counts of argmax
    flips; no near-tie of the logits flips here)."""
    a, b = np.load(fused / "forgetting.npz"), np.load(alone / "forgetting.npz")
    assert a.files == b.files == ["events", "ever_correct", "labels"]
    for key in a.files:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert a["events"].sum() > 0 and a["ever_correct"].any()  # something to compare


def test_fused_runs_count_their_own_forgetting_events(runs: dict[str, Any], tmp_path: Path) -> None:
    """Each tracking run of a group writes the forgetting.npz train() writes alone (and its
    metrics and model as alone); the run that does not track writes none."""
    threads = torch.get_num_threads()
    outs = [tmp_path / f"f{i}" for i in range(len(FORGETTING))]
    fused = train_fused(FORGETTING, outs)
    for i in (0, 2):
        train(FORGETTING[i], tmp_path / f"a{i}")
        assert_same_forgetting(outs[i], tmp_path / f"a{i}")
        assert_same_run(outs[i], tmp_path / f"a{i}")
        assert fused[i]["best_epoch"] == runs["alone"][i]["best_epoch"]
        a, b = model_state(outs[i]), model_state(runs["root"] / f"alone{i}")  # tracking changes no weight
        for name in a:
            assert_close(a[name], b[name], **WEIGHTS)
    assert not (outs[1] / "forgetting.npz").exists()
    assert_same_run(outs[1], runs["root"] / "alone1")
    torch.set_num_threads(threads)
    # the comparison can fail: another seed's events differ
    train({**FORGETTING[0], "seed": 7}, tmp_path / "other")
    with pytest.raises(AssertionError):
        assert_same_forgetting(outs[0], tmp_path / "other")


def test_no_host_reads_while_counting_forgetting(monkeypatch: pytest.MonkeyPatch, forbid_host_reads) -> None:
    """Counting forgetting events adds no host read to a fused epoch (nor to a captured step)."""
    group, cfgs = group_on_cpu(FORGETTING)
    group.track_forgetting([None] * len(cfgs))
    forbid_host_reads()
    group.epoch()
    monkeypatch.undo()
    assert int(group.forgetting["ever_correct"].sum()) > 0


def test_forgetting_counts_resume_from_a_fused_checkpoint(tmp_path: Path, crash_fused_group) -> None:
    """A group killed at the end of epoch 2 keeps each run's counts in its checkpoint: run 0 resumed
    in a (new) fused group and run 1 resumed alone by train() both end with the counts of their
    runs trained alone without a break."""

    group = [{**FORGETTING[0], "checkpoint_seconds": 0}, {**FORGETTING[2], "checkpoint_seconds": 0}]
    outs = [tmp_path / "a", tmp_path / "b"]
    crash_fused_group(group, outs, epoch=2)
    for out in outs:
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state["epoch"] == 2 and state["forgetting"]["events"].sum() > 0
    threads = torch.get_num_threads()
    train_fused(group[:1], outs[:1])
    train(group[1], outs[1])
    for i, cfg in enumerate(group):
        train(cfg, tmp_path / f"alone{i}")
        assert_same_forgetting(outs[i], tmp_path / f"alone{i}")
    torch.set_num_threads(threads)
