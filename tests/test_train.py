"""Tests of the trainer: the batched crop+flip augmentation, a tiny end-to-end run on the embedded
digits, WB's second stage and divergence handling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from trainables.config import config_hash, resolve_config
from trainables.data import load_dataset
from trainables.device_data import crop_flip
from trainables.models import ModelSpec, build_model
from trainables.run_files import load_metrics
from trainables.train import TrainingDiverged, train

PAD = 4

# --- crop_flip -----------------------------------------------------------------------------------


def candidate_crops(images: np.ndarray, pad: int) -> np.ndarray:
    """All (2*pad+1)^2 crops of the zero-padded images, unflipped and flipped:
    shape (B, 2, 2*pad+1, 2*pad+1, C, H, W), index 1 of axis 1 being the flipped crop."""
    b, c, h, w = images.shape
    padded = np.zeros((b, c, h + 2 * pad, w + 2 * pad), dtype=images.dtype)
    padded[:, :, pad : pad + h, pad : pad + w] = images
    win = sliding_window_view(padded, (h, w), axis=(2, 3))  # (B, C, 2p+1, 2p+1, H, W)
    win = win.transpose(0, 2, 3, 1, 4, 5)  # (B, 2p+1, 2p+1, C, H, W)
    return np.stack([win, win[..., ::-1]], axis=1)


def match_candidates(out: np.ndarray, images: np.ndarray, pad: int) -> np.ndarray:
    """(B, 2, 2p+1, 2p+1) bool: which candidate crop each output image equals exactly."""
    cands = candidate_crops(images, pad)
    return (cands == out[:, None, None, None]).all(axis=(-3, -2, -1))


def test_crop_flip_outputs_are_exact_padded_crops() -> None:
    rng = np.random.default_rng(0)
    # non-square, 3 channels, no zero pixels: any zero in an output must come from the padding
    images = rng.integers(1, 256, size=(48, 3, 6, 10), dtype=np.uint8)
    gen = torch.Generator().manual_seed(5)
    out = crop_flip(torch.from_numpy(images), PAD, gen)
    assert out.dtype == torch.uint8 and out.shape == (48, 3, 6, 10)
    hits = match_candidates(out.numpy(), images, PAD)
    assert (hits.sum(axis=(1, 2, 3)) == 1).all()
    # the same generator state gives the same batch; another seed a different one
    again = crop_flip(torch.from_numpy(images), PAD, torch.Generator().manual_seed(5))
    other = crop_flip(torch.from_numpy(images), PAD, torch.Generator().manual_seed(6))
    assert torch.equal(out, again)
    assert not torch.equal(out, other)


def test_crop_flip_centre_crop_without_padding_is_identity_or_flip() -> None:
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5)
    out = crop_flip(images, 0, torch.Generator().manual_seed(0))
    for o, x in zip(out, images, strict=True):
        assert torch.equal(o, x) or torch.equal(o, x.flip(-1))


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_crop_flip_distribution() -> None:
    n = 4500
    image = np.random.default_rng(1).integers(1, 256, size=(1, 1, 8, 8), dtype=np.uint8)
    batch = torch.from_numpy(np.repeat(image, n, axis=0))
    out = crop_flip(batch, PAD, torch.Generator().manual_seed(123)).numpy()
    cands = candidate_crops(image, PAD)[0].reshape(2 * 81, 64)  # (flip, oy, ox) flattened
    eq = (out.reshape(n, 1, 64) == cands[None]).all(axis=2)  # (n, 162)
    assert (eq.sum(axis=1) == 1).all()
    flip, oy, ox = np.unravel_index(eq.argmax(axis=1), (2, 9, 9))
    # chi-square with 8 degrees of freedom: 26.1 is the 0.999 quantile; 80 d.o.f.: 124.8
    assert chi_square(np.bincount(oy, minlength=9)) < 26.1
    assert chi_square(np.bincount(ox, minlength=9)) < 26.1
    assert chi_square(np.bincount(oy * 9 + ox, minlength=81)) < 124.8
    assert set(oy.tolist()) == set(range(9)) and set(ox.tolist()) == set(range(9))
    assert abs(flip.mean() - 0.5) < 0.03  # 4 standard errors
    # flips are not tied to the offsets
    assert abs(flip[ox < 4].mean() - flip[ox > 4].mean()) < 0.06
    # padding is zeros: an offset of 0 puts exactly `PAD` zero rows at the top
    top_left = (oy == 0) & (ox == 0) & (flip == 0)
    assert top_left.any()
    assert (out[top_left][:, :, :PAD, :] == 0).all() and (out[top_left][:, :, PAD:, PAD:] > 0).all()


# --- a tiny end-to-end run -----------------------------------------------------------------------

TINY = {"dataset": "digits-lt", "model": "mlp3", "width": 32, "epochs": 2, "threads": 1, "device": "cpu",
        "la": ["none", "add", "mult"], "seed": 0}
TAU = [1.0 + 0.05 * i for i in range(21)]
GAMMA = [0.05 * i for i in range(21)]


@pytest.fixture(scope="module")
def threads_kept():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory, threads_kept: None) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("stage1")
    reports: list[dict[str, Any]] = []
    metrics = train(dict(TINY), out, report=reports.append)
    return {"out": out, "metrics": metrics, "reports": reports}


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray, c: int) -> float:
    pred = logits.argmax(1)
    return 100.0 * float(np.mean([(pred[labels == k] == k).mean() for k in range(c)]))


def test_run_writes_its_artifacts(stage1: dict[str, Any]) -> None:
    out: Path = stage1["out"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "logits.npz", "metrics.json", "model.pt"]
    assert json.loads((out / "config.json").read_text()) == resolve_config(TINY)
    m = stage1["metrics"]
    assert load_metrics(out) == m
    assert json.loads((out / "metrics.json").read_text()) == m
    assert "_arrays" not in m


def test_run_metrics(stage1: dict[str, Any]) -> None:
    m = stage1["metrics"]
    assert math.isfinite(m["fdr_train"]) and m["fdr_train"] > 0
    assert math.isfinite(m["fdr_test"]) and m["fdr_test"] > 0
    assert m["best_epoch"] in (1, 2) and m["epochs"] == 2
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert stage1["reports"] == m["history"]
    # cosine schedule: epoch 1 at the full lr, epoch 2 at lr * (1 + cos(pi/2)) / 2
    assert m["history"][0]["lr"] == pytest.approx(0.01)
    assert m["history"][1]["lr"] == pytest.approx(0.005)
    assert set(m["la"]) == {"none", "add", "mult"}
    assert m["la"]["none"]["param"] is None
    assert any(math.isclose(m["la"]["add"]["param"], t, abs_tol=1e-9) for t in TAU)
    assert any(math.isclose(m["la"]["mult"]["param"], g, abs_tol=1e-9) for g in GAMMA)
    assert m["objective"] == max(r["val_acc"] for r in m["la"].values())


def test_run_accuracy_recomputed_from_logits(stage1: dict[str, Any]) -> None:
    m, out = stage1["metrics"], stage1["out"]
    arr = np.load(out / "logits.npz")
    z, y = arr["test_logits"], arr["test_labels"]
    assert z.shape == (500, 10)
    none = m["la"]["none"]
    assert none["avg"] == pytest.approx(balanced_accuracy(z, y, 10), abs=1e-6)
    assert none["val_acc"] == pytest.approx(balanced_accuracy(arr["val_logits"], arr["val_labels"], 10))
    # digits-lt groups: many > 50 training images, few < 20
    counts = arr["class_counts"]
    assert counts.tolist() == sorted(counts.tolist(), reverse=True) and counts.sum() == 423
    recall = np.asarray(none["acc_per_class"])
    assert none["many"] == pytest.approx(recall[counts > 50].mean())
    assert none["few"] == pytest.approx(recall[counts < 20].mean())
    assert none["medium"] == pytest.approx(recall[(counts >= 20) & (counts <= 50)].mean())
    # additive LA: z_k - tau log pi_k with the chosen tau
    tau = m["la"]["add"]["param"]
    prior = counts / counts.sum()
    assert m["la"]["add"]["avg"] == pytest.approx(balanced_accuracy(z - tau * np.log(prior), y, 10), abs=1e-6)


def test_checkpoint_reproduces_logits(stage1: dict[str, Any]) -> None:
    out = stage1["out"]
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["config"]["width"] == 32
    model = build_model(ModelSpec("mlp3", 10, 1, 8, width=32))
    model.load_state_dict(ckpt["model"])  # strict: same keys and shapes
    model.eval()
    data = load_dataset("digits-lt", None, None)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model((data.x_test.float() / 255.0 - mean) / std).numpy()
    np.testing.assert_allclose(logits, np.load(out / "logits.npz")["test_logits"], rtol=1e-4, atol=1e-4)


def test_stage2_trains_only_a_maxnormed_classifier(stage1: dict[str, Any], tmp_path: Path) -> None:
    first = stage1["out"] / "model.pt"
    cfg = {**TINY, "stage2": True, "init_from": str(first), "maxnorm": "iter", "stage2_epochs": 2,
           "la": ["none"]}
    metrics = train(cfg, tmp_path)
    assert metrics["epochs"] == 2 and metrics["best_epoch"] in (1, 2)
    s1 = torch.load(first, weights_only=True)["model"]
    s2 = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert s1.keys() == s2.keys()
    backbone = [k for k in s1 if k.startswith("backbone.")]
    assert any(k.endswith("running_mean") for k in backbone)
    for k in backbone:
        assert torch.equal(s1[k], s2[k]), k
    w1, w2 = s1["classifier.weight"].double(), s2["classifier.weight"].double()
    assert not torch.equal(w1, w2)
    n1 = w1.norm(dim=1)
    threshold = float(n1.min() + 0.1 * (n1.max() - n1.min()))
    assert float(n1.max()) > threshold + 1e-3  # the constraint binds
    assert (w2.norm(dim=1) <= threshold + 1e-5).all()


def test_diverging_run_raises(tmp_path: Path, threads_kept: None) -> None:
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train({**TINY, "width": 16, "lr": 1.0e6, "la": ["none"]}, tmp_path)
    assert load_metrics(tmp_path) is None
    assert not (tmp_path / "model.pt").exists()


def test_every_la_kind_is_evaluated_and_a_spec_reports_its_own(stage1: dict[str, Any]) -> None:
    """`la` is not hashed: one model serves a spec reporting only "none" (Table 2) and one reporting
    all three (Table 4); each gets its own rows and its own objective."""
    import pandas as pd

    from orchestrator.record.results import rows_for_run
    from trainables.config import objective

    metrics = stage1["metrics"]
    assert set(metrics["la"]) == {"none", "add", "mult"}
    kw = dict(spec="s", preset="p", method="wd", stage="repeat", mlflow_run_id=None,
              versions={"wbsweep": "x", "torch": "x", "ray": "x"}, created_at=pd.Timestamp("2026-01-01", tz="UTC"))
    only_none = rows_for_run(metrics, resolve_config({**TINY, "la": ["none"]}), **kw)
    assert [r["la"] for r in only_none] == ["none"]
    assert only_none[0]["objective"] == metrics["la"]["none"]["val_acc"]
    both = rows_for_run(metrics, resolve_config({**TINY, "la": ["mult", "add"]}), **kw)
    assert [r["la"] for r in both] == ["mult", "add"]
    best = max(metrics["la"]["mult"]["val_acc"], metrics["la"]["add"]["val_acc"])
    assert {r["objective"] for r in both} == {best} == {objective(metrics, ["add", "mult"])}
    assert config_hash(resolve_config({**TINY, "la": ["none"]})) == config_hash(resolve_config(TINY))


def test_a_resumed_run_counts_earlier_attempts_in_train_seconds_not_in_eval_seconds(tmp_path: Path) -> None:
    """An attempt stopped after epoch 2 (its checkpoint saved), said to have trained 1000 s; the
    resumed run's train_seconds include those, its eval_seconds are its evaluation's alone."""
    cfg = resolve_config({**TINY, "epochs": 3, "checkpoint_seconds": 0, "la": ["none"]})

    def stop_at_2(row: dict[str, Any]) -> None:
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, report=stop_at_2)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    state["seconds"] = 1000.0
    torch.save(state, tmp_path / "checkpoint.pt")
    metrics = train(cfg, tmp_path)
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert 1000.0 < metrics["train_seconds"] < 1000.0 + 60
    assert 0.0 <= metrics["eval_seconds"] < 60
