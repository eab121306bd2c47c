"""The authors' protocol (docs/DESIGN.md section 4): the pooled MNIST split, the learning-rate
schedule's timing, the augmentation option, and results tied to the data that made them."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import RayCluster, wbsweep, wbsweep_here
from sklearn.model_selection import train_test_split

from trainables.config import config_hash, resolve_config
from trainables.data import data_fingerprint, load_dataset
from trainables.device_data import DeviceData
from trainables.errors import WbsweepError
from trainables.train import lr_at_epoch_start, train


def test_pooled_split_is_sklearns_stratified_draw(tmp_path: Path, make_mnist) -> None:
    arrays = make_mnist(tmp_path / "MNIST" / "raw", per_class_train=2000, per_class_test=300, size=6)
    ds = load_dataset("mnist", data_root=tmp_path, split="pooled", download=False)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (3000, 10_000, 10_000)
    # the reference: scikit-learn's own calls on the pooled labels, test first, then validation
    y = np.concatenate([arrays["y_train"], arrays["y_test"]]).astype(np.int64)
    x = np.concatenate([arrays["x_train"], arrays["x_test"]])
    rest, test = train_test_split(np.arange(len(y)), test_size=10_000, random_state=0, stratify=y)
    train_idx, val = train_test_split(rest, test_size=10_000, random_state=0, stratify=y[rest])
    for split, idx in (("train", train_idx), ("val", val), ("test", test)):
        assert np.array_equal(ds.indices[split], idx)
        assert np.array_equal(getattr(ds, f"y_{split}").numpy(), y[idx])
        assert np.array_equal(getattr(ds, f"x_{split}").numpy()[:, 0], x[idx])
    assert len(set(train_idx) | set(val) | set(test)) == len(y)  # disjoint, everything used
    assert np.bincount(ds.y_test.numpy()).tolist() == [1000] * 10  # stratified: 2,300 per class pooled
    assert ds.class_counts == [300] * 10
    assert (ds.mean, ds.std) == ((0.1301,), (0.3069,))  # the authors' MNIST normalisation


@pytest.mark.realdata
def test_real_mnist_pooled_split_sizes(real_mnist_root: Path) -> None:
    ds = load_dataset("mnist", data_root=real_mnist_root, split="pooled", download=False)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (50_000, 10_000, 10_000)
    pooled = np.bincount(np.concatenate([ds.y_train, ds.y_val, ds.y_test]), minlength=10)
    for split in ("train", "val", "test"):
        counts = np.bincount(getattr(ds, f"y_{split}").numpy(), minlength=10)
        share = pooled * len(getattr(ds, f"y_{split}")) / pooled.sum()
        assert np.all(np.abs(counts - share) <= 1.0), (split, counts, share)  # stratified to the image


def test_pooled_split_is_refused_where_it_does_not_apply(tmp_path: Path, make_mnist) -> None:
    with pytest.raises(WbsweepError, match="pooled"):
        load_dataset("digits", split="pooled")
    make_mnist(tmp_path / "MNIST" / "raw", per_class_train=2000, per_class_test=300, size=6)
    with pytest.raises(WbsweepError, match="rho 1"):
        load_dataset("mnist-lt", data_root=tmp_path, split="pooled", download=False)


@pytest.mark.parametrize(("timing", "first", "last"), [("epoch_start", "lr1", 0.0), ("epoch_end", "lr0", "lrT-1")])
def test_lr_schedule_timing(timing: str, first, last) -> None:
    epochs, base = 6, 0.01
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    lrs = []
    for _ in range(epochs):
        lrs.append(lr_at_epoch_start(sched, timing))
        opt.step()
        if timing == "epoch_end":
            sched.step()
    cosine = [base * (1 + math.cos(math.pi * t / epochs)) / 2 for t in range(epochs + 1)]  # lr(t), by hand
    assert lrs == pytest.approx(cosine[1:] if timing == "epoch_start" else cosine[:-1], abs=1e-12)
    assert lrs[0] == pytest.approx(cosine[1] if first == "lr1" else base)
    assert lrs[-1] == pytest.approx(0.0 if last == 0.0 else cosine[epochs - 1], abs=1e-12)


def test_training_uses_the_authors_timing(tmp_path: Path) -> None:
    cfg = {"dataset": "digits-lt", "model": "mlp3", "width": 16, "epochs": 4, "lr": 0.05, "lr_step": "epoch_start",
           "device": "cpu", "threads": 1, "select": "last"}
    metrics = train(cfg, tmp_path / "run")
    lrs = [h["lr"] for h in metrics["history"]]
    assert lrs[0] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)) / 2) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert metrics["best_epoch"] == 4


def test_augment_option_turns_the_crop_on_and_off() -> None:
    data = load_dataset("digits-lt")
    assert DeviceData(data, torch.device("cpu")).crop is False  # digits: none by default
    dd = DeviceData(data, torch.device("cpu"), "crop_flip")
    assert dd.crop
    x = data.x_train[:64]
    gen = torch.Generator().manual_seed(0)
    assert not torch.equal(dd.prepare(x, True, gen), dd.normalise(x))  # shifted and flipped
    assert config_hash(resolve_config({"augment": "crop_flip"})) != config_hash(resolve_config({}))
    assert config_hash(resolve_config({"augment": "auto"})) == config_hash(resolve_config({}))  # old hashes stay


def test_fingerprint_follows_the_content(tmp_path: Path, make_mnist) -> None:
    make_mnist(tmp_path / "a" / "MNIST" / "raw", per_class_train=140, per_class_test=10, size=6, seed=0)
    make_mnist(tmp_path / "b" / "MNIST" / "raw", per_class_train=140, per_class_test=10, size=6, seed=1)
    a = load_dataset("mnist-lt", data_root=tmp_path / "a", download=False)
    a2 = load_dataset("mnist-lt", data_root=tmp_path / "a", download=False)
    b = load_dataset("mnist-lt", data_root=tmp_path / "b", download=False)
    assert data_fingerprint(a) == data_fingerprint(a2) != data_fingerprint(b)
    assert len(data_fingerprint(a)) == 16


def _cifar_sweep(tmp_path: Path, out: Path, root: Path, cluster: RayCluster,
                 env_root: bool = False) -> subprocess.CompletedProcess:
    """The sweep on the CIFAR files under ``root``: --data-root, or (``env_root``) a relative
    WBSWEEP_DATA_ROOT from the command's folder, which every trial (in folders of its own) must see.
    On the session's Ray cluster, whose trials do not have the command's environment: the command
    must hand them the folder itself."""
    spec = tmp_path / "cifar.yaml"
    spec.write_text("name: fakecifar\ntitle: fake then real\nlayout: accuracy\n"
                    "methods:\n  - {method: naive, la: [none]}\n"
                    "presets:\n  smoke:\n    train: {dataset: cifar10-lt, model: mlp3, width: 16, epochs: 1}\n"
                    "    seeds: [0]\n    resources: {cpus_per_trial: 1, gpus_per_trial: 0}\n")
    args = ["run", str(spec), "--preset", "smoke", "--out", str(out), "--quiet", "--address", cluster.address]
    env = {**cluster.env, "WBSWEEP_DATA_ROOT": os.path.relpath(root, tmp_path)} if env_root else cluster.env
    return wbsweep(*args, *([] if env_root else ["--data-root", str(root)]), env=env, cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_a_sweep_on_other_data_trains_again_and_reports_the_new_numbers(tmp_path: Path, make_cifar,
                                                                        ray_cluster: RayCluster, capsys) -> None:
    """Data A then data B under one dataset name and one --out: B's models are trained, B's numbers
    reported, A's rows stay and are told apart by their fingerprint."""
    out = tmp_path / "out"
    make_cifar(tmp_path / "a", 10, per_class_train=140, per_class_test=10, seed=0)
    make_cifar(tmp_path / "b", 10, per_class_train=140, per_class_test=10, seed=1)
    first = _cifar_sweep(tmp_path, out, tmp_path / "a", ray_cluster, env_root=True)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cifar_sweep(tmp_path, out, tmp_path / "b", ray_cluster)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "on other data" in second.stdout + second.stderr
    rows = pd.read_parquet(out / "results")
    assert rows["data_fingerprint"].nunique() == 2 and len(rows) == 2
    assert rows["config_hash"].nunique() == 2  # B's model is its own, not A's reused
    a_row, b_row = rows.sort_values("created_at").itertuples()
    # which rows are current depends on the data: where the spec's data cannot be read and the folder
    # holds rows on two, report asks for them in one line; given B's, it shows B's numbers
    unsure = wbsweep_here(capsys, "report", str(tmp_path / "cifar.yaml"), "--out", str(out), "--format", "csv")
    assert unsure.returncode == 2 and "give --data-root" in unsure.stderr, unsure.stderr
    report = wbsweep_here(capsys, "report", str(tmp_path / "cifar.yaml"), "--out", str(out), "--format", "csv",
                          "--data-root", str(tmp_path / "b"))
    assert report.returncode == 0, report.stderr
    assert f"{b_row.acc_avg:.6g}" in report.stdout
    status = wbsweep_here(capsys, "status", "--out", str(out))
    assert "cifar10-lt: rows from 2 different data" in status.stdout, status.stdout + status.stderr
