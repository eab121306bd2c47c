"""Re-running a model that trained in a fused group (docs/performance.md, "What fused training
preserves"): its rounding depends on its group's size and its place in it (recorded: fused_k,
fused_slot), never on the other models, so `wbsweep train --config` trains it fused again in a group
of copies of itself at its place and reproduces it bit for bit; alone (--alone), its float32 run
rounds differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from trainables.config import resolve_config
from trainables.fused import train_fused
from trainables.train import train

BASE = {"dataset": "digits-lt", "model": "mlp3", "width": 32, "epochs": 6, "threads": 1, "device": "cpu",
        "la": ["none"], "wd": 5e-3}


def cfg(seed: int, **kw) -> dict:
    """A training config as a sweep gives it (its data's fingerprint in it: `train --config` adds it)."""
    from trainables.datacache import dataset_fingerprint

    return resolve_config({**BASE, "seed": seed, "data_fingerprint": dataset_fingerprint("digits-lt"), **kw})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)["model"]


def fused(tmp: Path, name: str, group: list[dict]) -> list[Path]:
    outs = [tmp / name / f"m{i}" for i in range(len(group))]
    train_fused(group, outs)
    return outs


@pytest.mark.parametrize("model", [{}, {"model": "resnet32", "width": 4, "epochs": 2}], ids=["mlp3", "resnet32"])
def test_a_fused_model_depends_on_its_place_not_on_its_group_and_differs_alone(tmp_path, one_thread, model):
    """Its run in a group of K at place i is that of K copies of it at place i: the other models'
    values never enter it. mlp3's is even the same at any place and K; resnet32's may not be (a
    grouped convolution's slice at another offset), as the second check shows."""
    def c(seed: int, **kw) -> dict:
        return cfg(seed, **model, **kw)

    def same(a, b) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    for k, at, group in ((2, 0, [c(0), c(1)]), (3, 2, [c(2), c(1, wd=0.05), c(0)]), (4, 1, [c(3), c(0), c(1), c(2)])):
        mine = weights(fused(tmp_path, f"k{k}", group)[at])
        copies = weights(fused(tmp_path, f"copies{k}", [c(0)] * k)[at])
        assert same(mine, copies), (k, at)  # bit for bit
    pair, three = weights(tmp_path / "k2" / "m0"), weights(tmp_path / "k3" / "m2")
    assert same(pair, three) == (model == {})  # mlp3: any place and K; resnet32: not this one
    train(c(0), tmp_path / "alone")
    assert not same(pair, weights(tmp_path / "alone"))  # float32: another summation order


@pytest.mark.parametrize("model", [{}, {"model": "resnet32", "width": 4, "epochs": 2}], ids=["mlp3", "resnet32"])
def test_train_config_reproduces_a_fused_run_bit_for_bit(tmp_path, capsys, model):
    saved = fused(tmp_path, "sweep", [cfg(2, **model), cfg(1, **model), cfg(0, **model)])[2]
    metrics = json.loads((saved / "metrics.json").read_text())
    assert (metrics["fused_k"], metrics["fused_slot"]) == (3, 2)
    assert main(["train", "--config", str(saved / "config.json"), "--out", str(tmp_path / "again")]) == 0
    err = capsys.readouterr().err
    assert "training it fused again" in err and "reproduced exactly" in err, err
    (again,) = (tmp_path / "again").glob("*/seed0")
    assert all(torch.equal(a, b) for a, b in zip(weights(saved).values(), weights(again).values(), strict=True))
    assert not list((tmp_path / "again").glob("*/.mates-*"))  # the copies' folder is gone

    assert main(["train", "--config", str(saved / "config.json"), "--alone", "--out", str(tmp_path / "alone")]) == 0
    err = capsys.readouterr().err
    assert "differ in" in err and "now alone" in err and "without --alone" in err, err


@pytest.mark.parametrize("flag", [[], ["--alone"]])
def test_a_run_trained_alone_is_trained_alone(tmp_path, capsys, flag):
    train(cfg(0), tmp_path / "saved")
    config = str(tmp_path / "saved" / "config.json")
    assert main(["train", "--config", config, *flag, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "fused again" not in err and "reproduced exactly" in err, err
