"""The config hashes a spec resolves to now, computed without Ray (orchestrator/record/current.py),
are the ones the stage graph trains (issue #23, item 1): the same functions build both, a tuned
method's config comes from its tune stage's recorded choice, and what a sweep adds that depends on
the machine (device, threads, data_root) is not hashed; the data (their fingerprint) are.

Where the data cannot be read here, the report takes the data of the rows that match the spec and
says so, or refuses in one line when rows on several data would match."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.record.current import current_configs, resolve
from orchestrator.record.results import rows_for_run, write_rows
from orchestrator.spec import configs
from orchestrator.spec.experiment import load_experiment
from orchestrator.sweep.driver import Sweep, SweepOptions
from trainables.config import NOT_HASHED, config_hash, resolve_config
from trainables.trial import training_config

SPEC = """name: hashes
methods:
  - {method: wd, la: [none]}
  - {method: wb, la: [none]}
presets:
  p:
    train: {dataset: digits-lt, model: mlp3, epochs: 2, width: 16}
    hyper: {wd: 5.0e-3, stage2_wd: 0.1}
    search: {wd: {loguniform: [1.0e-4, 1.0e-1]}}
    trials: 2
    seeds: [0, 1]
    resources: {fuse: "off"}
"""


def test_the_graph_trains_the_config_hashes_the_report_resolves(tmp_path: Path, offline_graph) -> None:
    """wd is tuned (its config: the recorded choice), wb is its second stage (its parent's hash in its
    config). The report's computation runs with device auto, 1 thread and no data root; the sweep's
    with device cpu, 3 threads and a data root of its own: the same hashes."""
    (tmp_path / "hashes.yaml").write_text(SPEC)
    exp = load_experiment(str(tmp_path / "hashes.yaml"), "p")
    out = tmp_path / "out"
    runs = str(out.resolve() / "runs")
    before = current_configs([exp], out, runs, None)
    wd, wb = before.methods
    assert wd.config_hash is None and "has chosen no config yet" in wd.reason and wd.tune_record is not None
    assert wb.config_hash is None and "its first stage 'wd' has no current config" in wb.reason
    wd.tune_record.parent.mkdir(parents=True)
    wd.tune_record.write_text(json.dumps({"config": {}, "objective": 50.0, "searched": {"wd": 0.0123}}))
    wd, wb = current_configs([exp], out, runs, None).methods
    assert wd.config_hash and wb.config_hash and wd.config["wd"] == 0.0123

    root = tmp_path / "elsewhere"
    root.mkdir()
    sweep = Sweep(exp, SweepOptions(out=out, tracking_uri=f"sqlite:///{out}/mlflow.db", device="cpu",
                                    cpus_per_trial=3, data_root=str(root), fuse="off", quiet=True))
    machine = sweep.machine()
    assert (machine["device"], machine["threads"], machine["data_root"]) == ("cpu", 3, str(root.resolve()))
    assert set(machine) - {"data_fingerprint"} <= NOT_HASHED  # what depends on the machine is not hashed
    graph = offline_graph(sweep)
    handed = [graph.suggest(f"t{i}") for i in range(2)]
    assert [c["_stage"] for c in handed] == ["repeat:wd", "repeat:wd"]  # the tune stage found its choice
    assert graph.by_key["tune:wd"].record == wd.tune_record
    assert {config_hash(training_config(c)) for c in handed} == {wd.config_hash}
    wb_config = graph.base_config(exp.methods[1])
    assert configs.model_hash(wb_config, 0, graph.ctx.runs) == wb.config_hash
    assert wb_config["parent_hash"] == wd.config_hash

    # the data are hashed: the same spec on other data resolves to other hashes (and another tune record)
    other = resolve(exp, out, runs, None, "0123456789abcdef")
    assert other[0].tune_record != wd.tune_record and other[0].config_hash is None


MNIST_SPEC = """name: nine
methods:
  - {method: wd, la: [none]}
presets:
  p:
    train: {dataset: mnist-lt, rho: 10, val_per_class: 5, model: mlp3, epochs: 1, width: 16}
    seeds: [0]
"""


def write_model_rows(out: Path, exp, config_hash_: str, fingerprint: str | None, acc: float) -> None:
    cfg = resolve_config({**exp.train, "wd": 5e-3, "seed": 0, "la": ["none"], "data_fingerprint": fingerprint})
    metrics = {"config_hash": config_hash_, "fdr_train": 1.0, "fdr_test": 1.0, "epochs": 1, "best_epoch": 1,
               "train_seconds": 1.0, "node": "n", "device": "cpu", "data_fingerprint": fingerprint,
               "la": {"none": {"param": None, "val_acc": acc, "many": acc, "medium": acc, "few": acc, "avg": acc,
                               "acc_per_class": [acc] * 10}}}
    rows = rows_for_run(metrics, cfg, spec="nine", preset="p", method="wd", stage="repeat", mlflow_run_id=None,
                        versions={"wbsweep": "x", "torch": "x", "ray": "x"},
                        created_at=pd.Timestamp("2026-01-01", tz="UTC"))
    write_rows(out / "results", f"nine-p-wd-{config_hash_}-s0", rows)


def test_data_not_here_take_the_rows_data_said_or_refused(tmp_path: Path, make_mnist, capsys) -> None:
    """MNIST-LT files in one folder; the report run with --data-root at an empty one."""
    spec = tmp_path / "nine.yaml"
    spec.write_text(MNIST_SPEC)
    exp = load_experiment(str(spec), "p")
    data, empty, out = tmp_path / "data", tmp_path / "empty", tmp_path / "out"
    make_mnist(data / "mnist", 40, 5)
    empty.mkdir()
    runs = str(out.resolve() / "runs")
    (here,) = current_configs([exp], out, runs, str(data)).methods
    fingerprint = here.config["data_fingerprint"]
    write_model_rows(out, exp, here.config_hash, fingerprint, 61.0)
    args = ["report", str(spec), "--out", str(out)]
    assert main([*args, "--data-root", str(data)]) == 0
    text = capsys.readouterr().out
    assert "61.0" in text and "cannot be read here" not in text
    assert main([*args, "--data-root", str(empty)]) == 0
    text = capsys.readouterr().out
    assert "61.0" in text
    assert "NOTE the mnist-lt data cannot be read here" in text and f"fingerprint {fingerprint}" in text
    # rows on other data that match the spec too: which are current cannot be told without the data
    (there,) = resolve(exp, out, runs, None, "fedcba9876543210")
    write_model_rows(out, exp, there.config_hash, "fedcba9876543210", 12.0)
    assert main([*args, "--data-root", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "on 2 different data" in err and "--data-root" in err
    assert main([*args, "--data-root", str(data)]) == 0  # the data here tell: their rows
    text = capsys.readouterr().out
    assert "61.0" in text and "12.0" not in text


@pytest.mark.parametrize("knob", ["device", "threads", "data_root"])
def test_machine_keys_are_not_part_of_a_config_hash(knob: str) -> None:
    base = {"dataset": "digits-lt", "model": "mlp3", "wd": 5e-3, "data_fingerprint": "0123456789abcdef"}
    other = {"device": "cuda", "threads": 7, "data_root": "/somewhere/else"}[knob]
    assert config_hash(resolve_config({**base, knob: other})) == config_hash(resolve_config(base))
    assert config_hash(resolve_config({**base, "data_fingerprint": "fedcba9876543210"})) != \
        config_hash(resolve_config(base))


def test_rows_of_an_earlier_version_are_not_the_current_config(tmp_path: Path, make_mnist, capsys) -> None:
    """Rows written before the data's fingerprint was part of a config hash (no data_fingerprint) are
    not the config the spec asks for (the run trains it again): refused in one line naming
    --all-configs, which lists them; once the current config has rows, those are shown."""
    spec = tmp_path / "nine.yaml"
    spec.write_text(MNIST_SPEC)
    exp = load_experiment(str(spec), "p")
    data, out = tmp_path / "data", tmp_path / "out"
    make_mnist(data / "mnist", 40, 5)
    runs = str(out.resolve() / "runs")
    (legacy,) = resolve(exp, out, runs, None, None)
    (now,) = current_configs([exp], out, runs, str(data)).methods
    assert legacy.config_hash != now.config_hash
    write_model_rows(out, exp, legacy.config_hash, None, 33.0)
    args = ["report", str(spec), "--out", str(out), "--data-root", str(data)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 1 other config(s)" in err and "--all-configs" in err
    assert main([*args, "--all-configs"]) == 0
    assert legacy.config_hash in capsys.readouterr().out
    write_model_rows(out, exp, now.config_hash, now.config["data_fingerprint"], 44.0)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "44.0" in text and "33.0" not in text
