"""Re-running a model that trained in a fused group (docs/performance.md, "What fused training
preserves"): on a CPU its arithmetic depends on being fused, not on its group's size, its other
models or its place in the group, so `wbsweep train --config` trains it fused again (with a copy of
itself) and reproduces it bit for bit; alone (--alone), its float32 run rounds differently."""

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


def test_a_fused_model_is_the_same_in_any_group_and_differs_alone(tmp_path, one_thread):
    ref = weights(fused(tmp_path, "pair", [cfg(0), cfg(1)])[0])
    for name, group, at in (("other-mate", [cfg(0), cfg(2, wd=0.05)], 0), ("three", [cfg(2), cfg(1), cfg(0)], 2),
                            ("itself", [cfg(0), cfg(0)], 1)):
        got = weights(fused(tmp_path, name, group)[at])
        assert all(torch.equal(ref[k], got[k]) for k in ref), name  # bit for bit
    train(cfg(0), tmp_path / "alone")
    alone = weights(tmp_path / "alone")
    assert not all(torch.equal(ref[k], alone[k]) for k in ref)  # float32: another summation order


def test_train_config_reproduces_a_fused_run_bit_for_bit(tmp_path, capsys):
    saved = fused(tmp_path, "sweep", [cfg(0), cfg(1), cfg(2)])[1]
    assert json.loads((saved / "metrics.json").read_text())["fused_k"] == 3
    assert main(["train", "--config", str(saved / "config.json"), "--out", str(tmp_path / "again")]) == 0
    err = capsys.readouterr().err
    assert "training it fused again" in err and "reproduced exactly" in err, err
    (again,) = (tmp_path / "again").glob("*/seed1")
    assert all(torch.equal(a, b) for a, b in zip(weights(saved).values(), weights(again).values(), strict=True))
    assert not list((tmp_path / "again").glob("*/.mate-*"))  # the copy's folder is gone

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
