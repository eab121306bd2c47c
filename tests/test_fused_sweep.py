"""Fused groups in the sweep (issue #14): the stage graph hands out up to K models that share a
fusion key as one Ray Tune trial; each model still gets its own rows, MLflow run and progress count.
That a fused sweep gives the results of one model per trial is tested end to end by
tests/test_resilience.py::test_crashed_trials_are_retried_from_their_checkpoint (--fuse off, against
the shared fused smoke sweep); fused groups crashing and resuming by tests/test_storage.py's S3 sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import wbsweep

from orchestrator.spec.experiment import load_experiment
from orchestrator.sweep.driver import Sweep, SweepOptions
from orchestrator.sweep.fusion import CACHE_ENV, FUSION_FILE, cache_path, fuse_size, key_id, write_record
from orchestrator.sweep.graph import member_id, trial_members
from trainables.errors import WbsweepError
from trainables.fused import fusion_key
from trainables.reports import member_result
from trainables.trial import training_config


def sweep_for(tmp_path: Path, fuse: int | str, **opts) -> Sweep:
    out = tmp_path / "out"
    return Sweep(load_experiment("table4", "smoke"),
                 SweepOptions(out=out, tracking_uri=f"sqlite:///{out}/mlflow.db", fuse=fuse, quiet=True, **opts))


def test_the_graph_groups_models_that_share_a_fusion_key(tmp_path: Path, offline_graph) -> None:
    """table4 smoke, K = 3: every model ready at the start (the seeds of naive and cb, the searches of
    wd, wd_etf and wd_fr_etf) is handed out once, in groups of at most 3 whose members share one
    fusion key, seeds of one stage and methods of several stages mixed; WB (a second stage) waits."""
    graph = offline_graph(sweep_for(tmp_path, 3))
    handed: list[list[dict]] = []
    for i in range(20):
        config = graph.suggest(f"t{i}")
        if config is None:
            break
        handed.append([c for _, c in trial_members(f"t{i}", config)])
    sizes = [len(g) for g in handed]
    assert sizes == [3, 3, 3, 1], sizes  # 2 + 2 repeat seeds and 2 + 2 + 2 search trials = 10 models
    for group in handed:
        keys = {fusion_key(training_config(c)) for c in group}
        assert len(keys) == 1 and None not in keys
    stages = [c["_stage"] for g in handed for c in g]
    assert stages.count("repeat:naive") == 2 and stages.count("repeat:cb") == 2
    assert {s for s in stages if s.startswith("tune")} == {"tune:wd", "tune:wd_etf", "tune:wd_fr_etf"}
    assert not any("wb" in s for s in stages)
    assert {c["_stage"] for c in handed[0]} == {"repeat:naive", "repeat:cb"}  # one trial, two methods
    # searched knobs differ inside a group: two Optuna trials of wd in one fused trial
    wd = [c for c in handed[1] if c["_stage"] == "tune:wd"]
    assert len(wd) == 2 and wd[0]["wd"] != wd[1]["wd"]


def test_fuse_off_hands_out_one_model_per_trial(tmp_path: Path, offline_graph) -> None:
    config = offline_graph(sweep_for(tmp_path, "off")).suggest("t0")
    assert "_group" not in config and config["_stage"] == "repeat:naive"


def test_models_that_cannot_be_fused_get_no_key() -> None:
    base = {"dataset": "digits-lt", "model": "mlp3", "width": 16}
    assert fusion_key(base) is not None
    assert fusion_key({**base, "seed": 3, "wd": 1e-3, "loss": "cb", "lr": 0.1}) == fusion_key(base)
    assert fusion_key({**base, "width": 32}) != fusion_key(base)
    assert fusion_key({**base, "stage2": True, "parent_hash": "x"}) not in (None, fusion_key(base))  # WB's stage 2
    assert fusion_key({**base, "track_forgetting": True}) == fusion_key(base)  # counted per model
    assert fusion_key({**base, "compile": "torch"}) not in (None, fusion_key(base))  # one step for a group
    assert fusion_key(base, varies=("batch_size",)) is None  # a search over a shared key


def test_auto_uses_the_measured_k_of_each_fusion_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    offline_graph) -> None:
    """``fuse: auto`` groups each fusion key's models by the K measured for it: from the results
    folder's fusion.json (a resumed sweep), else from this machine's cache (a local cluster only); a
    measured K of 1 trains every model alone. (The measurement itself, as a Ray task, runs in the
    shared smoke sweep: tests/test_integration.py::test_auto_fuse_measures_once_and_groups_by_it.)"""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "machine.json"))
    sweep = sweep_for(tmp_path / "a", "auto")
    graph = offline_graph(sweep)
    graph.advance()
    key = graph.nodes[0].fusion_key()
    assert key is not None and key == fusion_key(graph.nodes[0].fusion_config()) and sweep.fusion.auto
    # a resumed sweep: its folder says K = 3 for this key
    write_record(sweep.out / FUSION_FILE, key_id(key), {"k": 3, "reason": "test"})
    sweep.fusion.start(machine=None)
    sizes = [len(trial_members(f"t{i}", c)) for i in range(4) if (c := graph.suggest(f"t{i}"))]
    assert sizes == [3, 3, 3, 1], sizes
    # a new folder on a local cluster: the machine's cache answers, and the folder records it
    fresh = sweep_for(tmp_path / "b", "auto")
    fresh_graph = offline_graph(fresh)
    fresh_graph.advance()
    cfg = fresh_graph.nodes[0].fusion_config()
    fresh.fusion.start(machine="host: CPU=2")
    write_record(cache_path(), fresh.fusion.cache_key(cfg), {"k": 1, "reason": "fusing does not pay here"})
    config = fresh_graph.suggest("t0")
    assert "_group" not in config  # K = 1: one model per trial
    assert json.loads((fresh.out / FUSION_FILE).read_text())[key_id(key)]["k"] == 1
    assert fresh.fusion.limit(key, cfg) == 1  # known now, for the rest of this sweep


# False: YAML reads an unquoted `fuse: off` as a boolean
@pytest.mark.parametrize("value, k", [("auto", None), ("off", 1), ("OFF", 1), (False, 1), (4, 4), ("4", 4),
                                      (1, 1)])
def test_fuse_size(value, k) -> None:
    assert fuse_size(value) == k


@pytest.mark.parametrize("value", [0, -2, "x", 2.5, "2.5", True, None, ""])
def test_fuse_size_refuses_nonsense_in_one_line(value) -> None:
    with pytest.raises(WbsweepError, match="fuse must be auto, off or a whole number"):
        fuse_size(value)


def test_member_result_reads_nested_and_flattened_reports() -> None:
    final = {"objective": 80.0, "la": {}}
    nested = {"objective": 80.0, "group": {"0": final, "1": {"diverged": "loss became nan at epoch 2"}}}
    assert member_result(nested, 0) == {"objective": 80.0, "final": final}
    assert member_result(nested, 1) is None and member_result(nested, 2) is None
    flat = {"objective": 80.0, "group/0/objective": 80.0, "group/1/diverged": "loss became nan"}
    assert member_result(flat, 0)["objective"] == 80.0
    assert member_result(flat, 1) is None and member_result(None, 0) is None
    assert [member_id("abc", i) for i in range(3)] == ["abc", "abc/1", "abc/2"]


WB_SPEC = """\
name: wbfused
title: "WB's second stages, fused"
default_preset: tiny
methods:
  - {method: wd, la: [none]}
  - {method: wb, la: [none]}
  - {method: wd_norm_cb, la: [none]}
presets:
  tiny:
    description: digits-LT, MLP3 of width 16, 2 + 2 epochs, 2 seeds, no search
    train: {dataset: digits-lt, model: mlp3, width: 16, epochs: 2, batch_size: 64, lr: 0.05, stage2_epochs: 2,
            maxnorm: iter}
    hyper: {wd: 5.0e-3, stage2_wd: 0.1}
    seeds: [0, 1]
    resources: {cpus_per_trial: 1, gpus_per_trial: 0}
"""


@pytest.mark.slow  # a real Ray sweep: ~30 s on 2 idle cores
def test_a_sweep_fuses_the_second_stages_of_wb(tmp_path: Path, ray_cluster) -> None:
    """`wbsweep run --fuse 4` of WD and its two second stages (WB: MaxNorm per step; WD&Norm&CB:
    unit-norm rows, no MaxNorm), 2 seeds, one trial at a time (so each trial finds every model its
    inputs allow): WD's seeds train as one trial, then the four second stages -- two methods, two
    parents -- as one (each run's metrics carry fused_k = 4). Each equals the run train() makes of
    its config alone (what ``--fuse off`` trains: the same config, from the same parent model) to
    float32 rounding, and its backbone is its parent's: the same train FDR, bit for bit."""
    import json

    import numpy as np
    import pandas as pd
    import torch
    from torch.testing import assert_close

    from trainables.train import train

    spec, out = tmp_path / "wbfused.yaml", tmp_path / "out"
    spec.write_text(WB_SPEC)
    proc = wbsweep("run", str(spec), "--out", str(out), "--fuse", "4", "--max-concurrent", "1", "--device", "cpu",
                   "--address", ray_cluster.address, env=ray_cluster.env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_parquet(out / "results")
    assert sorted(df["method"]) == ["wb", "wb", "wd", "wd", "wd_norm_cb", "wd_norm_cb"]
    parents = df[df["method"] == "wd"].set_index("seed")
    stage2 = df[df["method"] != "wd"]
    threads = torch.get_num_threads()
    try:
        for row in stage2.itertuples():
            run = out / "runs" / row.config_hash / f"seed{row.seed}"
            metrics = json.loads((run / "metrics.json").read_text())
            assert metrics["fused_k"] == 4 and metrics["epochs"] == 2
            assert row.parent_hash == parents.loc[row.seed, "config_hash"]
            assert row.fdr_train == parents.loc[row.seed, "fdr_train"]  # the parent's features
            mine = tmp_path / "alone" / run.parent.name / run.name
            alone = train(json.loads((run / "config.json").read_text()), mine)
            assert alone["best_epoch"] == metrics["best_epoch"]
            assert alone["la"]["none"]["avg"] == row.acc_avg
            for key in ("fdr_train", "fdr_test", "objective"):
                assert_close(alone[key], metrics[key], rtol=1e-5, atol=1e-6)
            a = torch.load(run / "model.pt", weights_only=True)["model"]
            b = torch.load(mine / "model.pt", weights_only=True)["model"]
            for name in a:
                assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
            la, lb = np.load(run / "logits.npz"), np.load(mine / "logits.npz")
            assert_close(torch.from_numpy(la["test_logits"]), torch.from_numpy(lb["test_logits"]), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
