"""Tests of the experiment specs (orchestrator.spec.experiment): the table4 presets and the error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.spec.experiment import load_experiment
from trainables.errors import WbsweepError
from trainables.methods import get_method

TABLE4_METHODS = [
    ("naive", ["none"]),
    ("cb", ["none"]),
    ("wd", ["none", "add", "mult"]),
    ("wb", ["none"]),
    ("wd_etf", ["none", "add", "mult"]),
    ("wd_fr_etf", ["none", "add", "mult"]),
]


@pytest.mark.parametrize("preset", ["paper", "tuned", "cpu", "smoke"])
def test_every_table4_preset_loads(preset: str) -> None:
    exp = load_experiment("table4", preset)
    assert exp.name == "table4"
    assert exp.preset == preset
    assert exp.paper_table == 4
    assert [(m.method.name, m.la) for m in exp.methods] == TABLE4_METHODS
    assert exp.source.endswith("table4.yaml")


def test_default_preset_is_cpu() -> None:
    assert load_experiment("table4").preset == "cpu"


def test_paper_preset_values() -> None:
    exp = load_experiment("table4", "paper")
    assert exp.train["dataset"] == "cifar100-lt" and exp.train["model"] == "resnet34"
    assert exp.train["epochs"] == 320 and exp.train["batch_size"] == 64
    assert exp.hyper == {"wd": 5.0e-3, "fr": 1.0e-2, "stage2_wd": 0.1}
    assert exp.search == {} and exp.trials == 0
    assert exp.seeds == [0, 1, 2, 3, 4]


def test_tuned_extends_paper() -> None:
    paper, tuned = load_experiment("table4", "paper"), load_experiment("table4", "tuned")
    assert tuned.train == paper.train
    assert tuned.hyper == paper.hyper and tuned.seeds == paper.seeds
    assert tuned.trials == 16
    assert set(tuned.search) == {"wd", "fr", "stage2_wd"}


def test_smoke_extends_cpu_and_overrides_epochs() -> None:
    cpu = load_experiment("table4", "cpu")
    smoke = load_experiment("table4", "smoke")
    # inherited from cpu
    assert smoke.train["dataset"] == "digits-lt" == cpu.train["dataset"]
    assert smoke.train["model"] == "mlp3" and smoke.train["width"] == 128
    assert smoke.search == cpu.search and smoke.hyper == cpu.hyper
    assert smoke.resources == cpu.resources
    # overridden
    assert cpu.train["epochs"] == 40 and smoke.train["epochs"] == 2
    assert cpu.train["stage2_epochs"] == 10 and smoke.train["stage2_epochs"] == 1
    assert smoke.trials == 2 and smoke.seeds == [0, 1]
    assert cpu.trials == 8 and cpu.seeds == [0, 1, 2, 3, 4]
    # resolving smoke did not leak into cpu
    assert load_experiment("table4", "cpu").train["epochs"] == 40


def test_searched_for_gives_each_method_its_knobs() -> None:
    exp = load_experiment("table4", "cpu")
    knobs = {m.method.name: set(exp.searched_for(m.method)) for m in exp.methods}
    assert knobs == {
        "naive": set(), "cb": set(), "wd": {"wd"}, "wb": {"stage2_wd"}, "wd_etf": {"wd"},
        "wd_fr_etf": {"wd", "fr"},
    }
    assert exp.searched_for(get_method("wd"))["wd"] == {"loguniform": [1.0e-4, 5.0e-2]}
    paper = load_experiment("table4", "paper")
    assert all(paper.searched_for(m.method) == {} for m in paper.methods)


# --- errors --------------------------------------------------------------------------------------


def base_spec() -> dict[str, Any]:
    return {
        "name": "mine",
        "methods": [{"method": "naive", "la": ["none"]}, {"method": "wd", "la": ["none", "add"]},
                    {"method": "wb"}],
        "presets": {
            "base": {"train": {"dataset": "digits-lt", "epochs": 3}, "hyper": {"wd": 0.01},
                     "search": {"wd": {"loguniform": [1.0e-4, 1.0e-1]}}, "trials": 2, "seeds": [0, 1]},
            "small": {"extends": "base", "train": {"epochs": 1}},
        },
    }


def write_spec(tmp_path: Path, doc: dict[str, Any], name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def error_of(*args: Any) -> str:
    with pytest.raises(WbsweepError) as info:
        load_experiment(*args)
    return str(info.value)


def test_spec_from_path_loads(tmp_path: Path) -> None:
    exp = load_experiment(str(write_spec(tmp_path, base_spec())), "small")
    assert exp.train == {"dataset": "digits-lt", "epochs": 1}
    assert [(m.method.name, m.la) for m in exp.methods] == [("naive", ["none"]), ("wd", ["none", "add"]),
                                                            ("wb", ["none"])]
    assert exp.trials == 2 and exp.seeds == [0, 1]


def test_unknown_spec_name_suggests() -> None:
    msg = error_of("tabel4")
    assert "tabel4" in msg and "Did you mean 'table4'" in msg


def test_unknown_preset_suggests() -> None:
    msg = error_of("table4", "smok")
    assert "smok" in msg and "Did you mean 'smoke'" in msg


def test_malformed_yaml_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    # line 3 has a second ':' after a plain scalar: "mapping values are not allowed here"
    path.write_text("name: broken\nmethods: [naive]\ntitle: a: b\npresets: {p: {}}\n")
    msg = error_of(str(path))
    assert f"{path}:3:" in msg
    assert "malformed" in msg


def test_unknown_method(tmp_path: Path) -> None:
    doc = base_spec()
    doc["methods"].append({"method": "wd_etff", "la": ["none"]})
    msg = error_of(str(write_spec(tmp_path, doc)), "base")
    assert "unknown method 'wd_etff'" in msg and "Did you mean 'wd_etf'" in msg


def test_unknown_training_option(tmp_path: Path) -> None:
    doc = base_spec()
    doc["presets"]["base"]["train"]["epochz"] = 4
    msg = error_of(str(write_spec(tmp_path, doc)), "small")
    assert "epochz" in msg and "unknown training option" in msg


def test_bad_search_distribution(tmp_path: Path) -> None:
    doc = base_spec()
    doc["presets"]["base"]["search"] = {"wd": {"normal": [0.0, 1.0]}}
    msg = error_of(str(write_spec(tmp_path, doc)), "base")
    assert "search.wd" in msg and "loguniform" in msg


def test_loguniform_needs_positive_increasing_bounds(tmp_path: Path) -> None:
    doc = base_spec()
    doc["presets"]["base"]["search"] = {"wd": {"loguniform": [0.0, 1.0]}}
    msg = error_of(str(write_spec(tmp_path, doc)), "base")
    assert "search.wd.loguniform" in msg


def test_wb_without_wd(tmp_path: Path) -> None:
    doc = base_spec()
    doc["methods"] = [m for m in doc["methods"] if m["method"] != "wd"]
    msg = error_of(str(write_spec(tmp_path, doc)), "base")
    assert "wb" in msg and "'wd'" in msg and "first stage" in msg


def test_presets_extending_in_a_loop(tmp_path: Path) -> None:
    doc = base_spec()
    doc["presets"]["base"]["extends"] = "small"
    msg = error_of(str(write_spec(tmp_path, doc)), "small")
    assert "loop" in msg and "small -> base -> small" in msg


def test_nonexistent_yaml_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "spec.yaml"
    msg = error_of(str(missing))
    assert str(missing) in msg and "does not exist" in msg


def test_exponents_without_a_dot_are_numbers(tmp_path) -> None:
    """PyYAML (YAML 1.1) reads 1e-3 as a string; a spec means the number."""
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: exp\nmethods:\n  - {method: wd}\npresets:\n  cpu:\n"
                    "    train: {lr: 5e-2}\n    hyper: {wd: 1e-3}\n    search: {wd: {loguniform: [1e-4, 1E-2]}}\n")
    exp = load_experiment(str(spec), "cpu")
    assert exp.train["lr"] == 0.05 and exp.hyper["wd"] == 0.001
    assert exp.search["wd"] == {"loguniform": [0.0001, 0.01]}
