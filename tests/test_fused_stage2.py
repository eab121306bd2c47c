"""Fused training of WB's second stage (trainables/fused.py): a group of second stages -- different
parents, seeds, MaxNorm radii and timings, losses, weight decays, one with unit-norm rows -- writes
what each writes when trained alone by train(), with the backbone frozen bit for bit."""

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
from trainables.fused import check_fusable, fusion_key, train_fused
from trainables.heads import maxnorm_threshold
from trainables.train import train

# Two first stages (WD), of different seeds and lengths: a second stage's epochs are its own.
PARENT = {"dataset": "digits-lt", "model": "mlp3", "width": 32, "epochs": 2, "threads": 1, "device": "cpu",
          "lr": 0.05, "wd": 5e-3, "checkpoint_seconds": 1e9}
PARENTS = [{**PARENT, "seed": 0}, {**PARENT, "seed": 1, "epochs": 3, "lr": 0.03, "fr": 1e-2}]  # FR: not in stage 2
STAGE2 = {"stage2": True, "stage2_epochs": 3, "stage2_wd": 0.1, "stage2_loss": "cb", "maxnorm": "iter"}
#: (parent, overrides): MaxNorm per step and per epoch, CE and CB, other weight decays, learning rates,
#: momentum, schedule timing, selection, radius; WD&Norm&CB's unit-norm rows without MaxNorm
GROUP = [
    (0, {"seed": 0}),
    (1, {"seed": 1, "maxnorm": "epoch", "stage2_loss": "ce", "stage2_wd": 0.05, "select": "last"}),
    (0, {"seed": 2, "stage2_init_norm": True, "maxnorm": "none", "lr_step": "epoch_start", "lr": 0.1}),
    (1, {"seed": 3, "maxnorm_alpha": 0.5, "momentum": 0.8, "track_forgetting": True}),  # no forgetting in stage 2
]

# As tests/test_fused.py's float32 bounds (the fused step's batched products sum in another order).
WEIGHTS = {"rtol": 1e-5, "atol": 1e-5}
SCALARS = {"rtol": 1e-5, "atol": 1e-6}
TIMING = {"train_seconds", "eval_seconds", "node", "fused_k", "fused_slot"}


def model_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["model"]


def stage2_configs(root: Path, group=GROUP) -> list[dict[str, Any]]:
    return [{**PARENTS[p], **STAGE2, "init_from": str(root / f"parent{p}" / "model.pt"), **extra}
            for p, extra in group]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("stage2")
    for i, cfg in enumerate(PARENTS):
        train(cfg, root / f"parent{i}")
    cfgs = stage2_configs(root)
    rows: list[tuple[int, dict[str, Any]]] = []
    fused = train_fused(cfgs, [root / f"fused{i}" for i in range(len(cfgs))],
                        report=lambda epoch_rows: rows.extend(epoch_rows.items()))
    alone = [train(cfg, root / f"alone{i}") for i, cfg in enumerate(cfgs)]
    torch.set_num_threads(threads)
    return {"root": root, "cfgs": cfgs, "fused": fused, "alone": alone, "rows": rows}


def assert_same_run(fused: Path, alone: Path) -> None:
    a, b = model_state(fused), model_state(alone)
    assert a.keys() == b.keys()
    for name in a:
        assert_close(a[name], b[name], **WEIGHTS, msg=lambda m, n=name: f"{n}: {m}")
    la, lb = np.load(fused / "logits.npz"), np.load(alone / "logits.npz")
    assert la.files == lb.files
    for key in la.files:
        assert_close(torch.from_numpy(la[key]), torch.from_numpy(lb[key]), **WEIGHTS)
    assert json.loads((fused / "config.json").read_text()) == json.loads((alone / "config.json").read_text())


def assert_backbone_is_parents(run: Path, parent: Path) -> None:
    """Every backbone tensor (weights, BN affine and running statistics, num_batches_tracked) bit
    for bit the parent's."""
    mine, theirs = model_state(run), model_state(parent)
    names = [n for n in theirs if n.startswith("backbone.")]
    assert any("running_mean" in n for n in names) and any("num_batches_tracked" in n for n in names)
    for name in names:
        assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("i", range(len(GROUP)))
def test_fused_second_stage_writes_what_it_writes_alone(runs: dict[str, Any], i: int) -> None:
    """Files, weights, logits, config; metrics (the chosen epoch, the per-epoch losses, accuracies
    and learning rates, FDR, every LA variant) to float32 rounding."""
    root = runs["root"]
    fused, alone = root / f"fused{i}", root / f"alone{i}"
    assert sorted(p.name for p in fused.iterdir()) == sorted(p.name for p in alone.iterdir())
    assert not (fused / "forgetting.npz").exists()  # train() tracks no forgetting in a second stage
    assert_same_run(fused, alone)
    fm, am = runs["fused"][i], runs["alone"][i]
    assert fm["fused_k"] == len(GROUP)
    assert set(fm) - TIMING == set(am) - TIMING
    assert fm["epochs"] == am["epochs"] == STAGE2["stage2_epochs"]
    assert fm["best_epoch"] == am["best_epoch"]
    assert fm["config_hash"] == am["config_hash"]
    for h, g in zip(fm["history"], am["history"], strict=True):
        assert h["epoch"] == g["epoch"] and h["lr"] == g["lr"] and h["val_acc"] == g["val_acc"]
        assert_close(h["train_loss"], g["train_loss"], **SCALARS)
    for key in ("fdr_train", "fdr_test", "objective"):
        assert_close(fm[key], am[key], **SCALARS)
    for la in am["la"]:
        for key, value in am["la"][la].items():
            assert_close(fm["la"][la][key], value, **SCALARS, msg=lambda m, k=key, v=la: f"la {v} {k}: {m}")


@pytest.mark.parametrize("i", range(len(GROUP)))
def test_fused_second_stage_keeps_its_parents_backbone(runs: dict[str, Any], i: int) -> None:
    """The backbone (eval-mode BatchNorm, not trained) is bit for bit the parent's, as train()'s is;
    the classifier did train; MaxNorm holds the rows within each run's own radius."""
    root = runs["root"]
    parent = root / f"parent{GROUP[i][0]}"
    assert_backbone_is_parents(root / f"fused{i}", parent)
    assert_backbone_is_parents(root / f"alone{i}", parent)
    mine, theirs = model_state(root / f"fused{i}"), model_state(parent)
    assert not torch.equal(mine["classifier.weight"], theirs["classifier.weight"])
    cfg = resolve_config(runs["cfgs"][i])
    rows = theirs["classifier.weight"]
    if cfg["stage2_init_norm"]:
        rows = rows / rows.norm(dim=1, keepdim=True)
    radius = maxnorm_threshold(rows, cfg["maxnorm_alpha"])
    norms = mine["classifier.weight"].norm(dim=1)
    if cfg["maxnorm"] != "none":  # the last projection (after the last step, or the last epoch) holds
        assert float(norms.max()) <= radius * (1 + 1e-5)


def test_fused_second_stage_reports_each_run_every_epoch(runs: dict[str, Any]) -> None:
    for i, am in enumerate(runs["alone"]):
        rows = [row for j, row in runs["rows"] if j == i]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert [r["val_acc"] for r in rows] == [h["val_acc"] for h in am["history"]]


def test_the_comparisons_can_fail(runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run 0 with its backbone's BatchNorm in train mode in the fused step moves its running
    statistics off its parent's; with MaxNorm left out it ends far from run 0 alone."""
    from trainables.fused_model import FusedModels

    cfgs = [{**runs["cfgs"][0], "stage2_epochs": 1}, {**runs["cfgs"][1], "stage2_epochs": 1}]
    root = runs["root"]
    monkeypatch.setattr(FusedModels, "bn_training", property(lambda self: self.training))
    train_fused(cfgs, [tmp_path / "bn0", tmp_path / "bn1"])
    with pytest.raises(AssertionError):
        assert_backbone_is_parents(tmp_path / "bn0", root / "parent0")
    monkeypatch.undo()
    monkeypatch.setattr(FusedModels, "_apply_maxnorm", lambda self, radii: None)
    train_fused(cfgs, [tmp_path / "mn0", tmp_path / "mn1"])
    train(cfgs[0], tmp_path / "alone0")
    assert_backbone_is_parents(tmp_path / "mn0", root / "parent0")
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "mn0", tmp_path / "alone0")


def test_a_killed_second_stage_group_resumes_from_its_checkpoints(runs: dict[str, Any], tmp_path: Path,
                                                                   crash_fused_group) -> None:
    """Killed at the end of epoch 2 (after each run's checkpoint: its classifier, momentum, schedule),
    the group started again resumes both runs and each ends as it does trained alone."""

    group = [{**cfg, "checkpoint_seconds": 0} for cfg in runs["cfgs"][:2]]
    outs = [tmp_path / "a", tmp_path / "b"]
    crash_fused_group(group, outs, epoch=2)
    for out in outs:
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    rows: list[tuple[int, dict[str, Any]]] = []
    results = train_fused(group, outs, report=lambda epoch_rows: rows.extend(epoch_rows.items()))
    assert sorted((i, r["epoch"]) for i, r in rows) == [(0, 3), (1, 3)]
    for i, out in enumerate(outs):
        a, b = model_state(out), model_state(runs["root"] / f"alone{i}")
        for name in a:
            assert_close(a[name], b[name], **WEIGHTS, msg=lambda m, n=name, i=i: f"run {i} {n}: {m}")
        assert results[i]["best_epoch"] == runs["alone"][i]["best_epoch"]
        assert_backbone_is_parents(out, runs["root"] / f"parent{GROUP[i][0]}")


def test_first_and_second_stages_are_never_fused_together(runs: dict[str, Any], tmp_path: Path) -> None:
    first, second = resolve_config(PARENTS[0]), resolve_config(runs["cfgs"][0])
    with pytest.raises(WbsweepError, match="stage2"):
        check_fusable([second, first])
    with pytest.raises(WbsweepError, match="epochs"):  # a second stage shares its own epochs
        check_fusable([second, {**second, "stage2_epochs": 4}])
    check_fusable([second, {**second, "epochs": 7}])  # the parent's epochs do not matter
    with pytest.raises(WbsweepError, match="stage2"):
        train_fused([runs["cfgs"][0], PARENTS[0]], [tmp_path / "a", tmp_path / "b"])


def test_second_stages_are_keyed_without_their_parents_model() -> None:
    """The sweep's stage-2 configs name their parent by parent_hash (init_from is filled in for the
    trial): the key comes from the config alone, equal for a WB method's seeds and searched
    stage2_wd, different from the first stage's and for other stage2_epochs."""
    first = {"dataset": "digits-lt", "model": "mlp3", "width": 16, "epochs": 4, "wd": 5e-3}
    second = {**first, "stage2": True, "parent_hash": "abc", "stage2_wd": 0.1}
    key = fusion_key(second)
    assert key is not None and key != fusion_key(first)
    assert fusion_key({**second, "seed": 3, "parent_hash": "def", "stage2_wd": 0.3, "maxnorm": "epoch",
                       "stage2_loss": "ce", "track_forgetting": True}) == key
    assert fusion_key({**second, "init_from": "/nowhere/model.pt"}) == key  # never read
    assert fusion_key({**second, "epochs": 9}) == key  # the parent's length
    assert fusion_key({**second, "stage2_epochs": 5}) not in (None, key)
    assert fusion_key(second, varies=("stage2_wd",)) == key
    assert fusion_key(second, varies=("stage2_epochs",)) is None
    assert fusion_key({**first, "stage2_epochs": 5}) == fusion_key(first)  # a first stage's stage2_epochs: unused


# --- a convolutional backbone (BatchNorm2d in eval mode), in float64 as tests/test_fused.py's conv tests ---

WEIGHTS64 = {"rtol": 1e-7, "atol": 1e-7}
SCALARS64 = {"rtol": 1e-9, "atol": 1e-12}


def test_conv_second_stage_equals_alone_in_float64(float64: None, tmp_path: Path) -> None:
    """resnet32 (BatchNorm2d in the grouped-convolution layout, eval mode): two second stages of one
    parent, MaxNorm per step and per epoch, equal their runs alone to float64 rounding, their
    backbones bit for bit the parent's."""
    parent = {**PARENT, "model": "resnet32", "width": 4, "epochs": 1, "augment": "crop_flip"}
    train(parent, tmp_path / "parent")
    base = {**parent, **STAGE2, "stage2_epochs": 2, "init_from": str(tmp_path / "parent" / "model.pt")}
    group = [{**base, "seed": 0}, {**base, "seed": 1, "maxnorm": "epoch", "stage2_loss": "ce"}]
    fused = train_fused(group, [tmp_path / f"f{i}" for i in range(len(group))])
    for i, cfg in enumerate(group):
        am = train(cfg, tmp_path / f"a{i}")
        fm = fused[i]
        assert fm["best_epoch"] == am["best_epoch"]
        for h, g in zip(fm["history"], am["history"], strict=True):
            assert h["val_acc"] == g["val_acc"]
            assert_close(h["train_loss"], g["train_loss"], **SCALARS64)
        for key in ("fdr_train", "fdr_test", "objective"):
            assert_close(fm[key], am[key], **SCALARS64)
        a, b = model_state(tmp_path / f"f{i}"), model_state(tmp_path / f"a{i}")
        for name in a:
            assert a[name].dtype == b[name].dtype
            assert_close(a[name], b[name], **WEIGHTS64, msg=lambda m, n=name, i=i: f"run {i} {n}: {m}")
        la, lb = np.load(tmp_path / f"f{i}" / "logits.npz"), np.load(tmp_path / f"a{i}" / "logits.npz")
        assert la["test_logits"].dtype == np.float64
        for key in la.files:
            assert_close(torch.from_numpy(la[key]), torch.from_numpy(lb[key]), **WEIGHTS64)
        assert_backbone_is_parents(tmp_path / f"f{i}", tmp_path / "parent")
