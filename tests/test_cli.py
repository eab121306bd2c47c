"""The CLI as a user meets it: one clear line and exit status 2 for their mistakes, no traceback,
nothing written where nothing should be."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import assert_user_error, wbsweep


def test_unknown_spec_suggests_the_closest(tmp_path):
    assert_user_error(wbsweep("run", "tabel4", "--out", str(tmp_path / "o")), "unknown spec 'tabel4'", "table4")
    assert not (tmp_path / "o").exists()


def test_unknown_preset(tmp_path):
    assert_user_error(wbsweep("run", "table4", "--preset", "smok", "--out", str(tmp_path)), "smoke")


def test_out_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert_user_error(wbsweep("run", "table4", "--preset", "smoke", "--out", str(f)), "is a file")
    assert f.read_text() == "keep me"


def test_missing_data_root(tmp_path):
    assert_user_error(wbsweep("run", "table4", "--preset", "smoke", "--out", str(tmp_path / "o"),
                              "--data-root", str(tmp_path / "nope")), "--data-root", "not a folder")


def test_malformed_spec_names_file_and_line(tmp_path):
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: mine\nmethods:\n  - {method: wd\npresets: {}\n")
    assert_user_error(wbsweep("run", str(spec), "--plan"), "mine.yaml:")


def test_report_before_any_run(tmp_path):
    assert_user_error(wbsweep("report", "table4", "--out", str(tmp_path)), "wbsweep run table4")


def test_debug_shows_the_traceback(tmp_path):
    proc = wbsweep("--debug", "run", "tabel4")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_plan_prints_the_stages_without_running(tmp_path):
    proc = wbsweep("run", "table4", "--preset", "cpu", "--plan", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "10 stages" in proc.stdout and "tune wd_fr_etf" in proc.stdout and "searching wd, fr" in proc.stdout
    assert "repeat wb" in proc.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("what", ["specs:", "methods:", "datasets:", "models:"])
def test_list(what, wbsweep_list):
    proc = wbsweep_list
    assert proc.returncode == 0 and what in proc.stdout
    assert "table4" in proc.stdout and "cifar100-lt" in proc.stdout and "resnet34" in proc.stdout


def test_train_one_model_without_ray(tmp_path):
    proc = wbsweep("train", "--method", "wd_etf", "--preset", "smoke", "--set", "epochs=1", "--set", "width=32",
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    # one folder per config and seed (as a sweep's runs/<hash>/seed<k>), named on stderr
    folder = Path(re.search(r"model folder: (\S+)", proc.stderr).group(1))
    summary = json.loads(proc.stdout)
    assert folder == tmp_path / summary["config_hash"] / "seed0" and (folder / "metrics.json").exists()
    assert_user_error(wbsweep("train", "--method", "wd", "--set", "epoch=3", "--out", str(tmp_path)), "epoch")


def test_set_values_read_exponents_as_numbers_and_bad_yaml_is_one_line():
    from orchestrator.commands import _parse_set
    from trainables.errors import WbsweepError

    # PyYAML alone reads 1e-3 as the string "1e-3" (YAML 1.1): the README's own example failed
    assert _parse_set(["wd=1e-3", "gamma_grid=[0, 5E-1]", "epochs=5", "la=none"]) == {
        "wd": 0.001, "gamma_grid": [0, 0.5], "epochs": 5, "la": "none"}
    with pytest.raises(WbsweepError, match="not valid YAML"):
        _parse_set(["epochs=[1"])


TWO_VARIANTS = """\
name: twovar
methods:
  - {method: wd, la: [none]}
presets:
  cpu:
    train: {model: mlp3, width: 8, epochs: 1}
    hyper: {wd: 5.0e-3}
    seeds: [0]
    variants:
      - {name: digits, train: {dataset: digits-lt}}
      - {name: cifar, train: {dataset: cifar10-lt, data_root: NOWHERE}}
"""


def test_every_variants_data_is_checked_before_any_variant_trains(tmp_path):
    """The second variant's missing CIFAR files used to surface after the first variant had trained."""
    spec = tmp_path / "twovar.yaml"
    spec.write_text(TWO_VARIANTS.replace("NOWHERE", str(tmp_path / "no-cifar-here")))
    out = tmp_path / "o"
    assert_user_error(wbsweep("run", str(spec), "--out", str(out)), "cifar")
    assert not (out / "results").exists() and not (out / "runs").exists()


@pytest.mark.parametrize(("flags", "word"), [
    (["--cpus-per-trial", "-1"], "cpus_per_trial"),
    (["--max-concurrent", "0"], "max_concurrent"),
    (["--gpus-per-trial", "-0.5"], "gpus_per_trial"),
    (["--max-failures", "-3"], "max_failures"),
])
def test_bad_resources_are_one_line_before_anything_is_written(tmp_path, flags, word):
    out = tmp_path / "o"
    assert_user_error(wbsweep("run", "table4", "--preset", "smoke", "--out", str(out), *flags), word)
    assert not (out / "status").exists() and not (out / "results").exists()


def test_spec_resources_of_the_wrong_type_are_one_line(tmp_path):
    spec = tmp_path / "res.yaml"
    spec.write_text(TWO_VARIANTS.replace("    variants:", "    resources: {cpus_per_trial: abc}\n    variants:")
                    .replace("NOWHERE", str(tmp_path)))
    assert_user_error(wbsweep("run", str(spec), "--out", str(tmp_path / "o")), "cpus_per_trial", "abc")


@pytest.mark.slow
def test_more_cpus_per_trial_than_the_local_cluster_has_is_an_error_not_a_hang(tmp_path):
    proc = wbsweep("run", "table4", "--preset", "smoke", "--out", str(tmp_path / "o"), "--cpus-per-trial", "100000")
    assert_user_error(proc, "100000 CPUs per trial", "--cpus-per-trial")


@pytest.mark.parametrize("name", ["optuna.db", "mlflow.db"])
def test_a_torn_database_in_out_is_one_line(tmp_path, name, ray_cluster):
    out = tmp_path / "o"
    out.mkdir()
    (out / name).write_bytes(b"SQLite format 3\x00" + b"\x01" * 200)  # a cut file
    # mlflow.db is opened once Ray is up: on the session's cluster, not a local one started for it
    proc = wbsweep("run", "table4", "--preset", "smoke", "--out", str(out), "--address", ray_cluster.address,
                   env=ray_cluster.env)
    assert_user_error(proc, name)
    assert not (out / "results").exists()


def test_train_on_a_finished_model_says_so_and_force_trains_again(tmp_path):
    args = ("train", "--method", "wd", "--preset", "smoke", "--set", "epochs=1", "--device", "cpu", "--out",
            str(tmp_path))
    first = wbsweep(*args)
    assert first.returncode == 0, first.stderr
    model = next(tmp_path.glob("*/seed0/model.pt"))
    stamp = model.stat().st_mtime_ns
    again = wbsweep(*args)
    assert again.returncode == 0 and "already trained" in again.stderr and "epoch" not in again.stderr.split(
        "already trained")[1]
    assert model.stat().st_mtime_ns == stamp and json.loads(again.stdout) == json.loads(first.stdout)
    forced = wbsweep(*args, "--force")
    assert forced.returncode == 0 and "epoch    1" in forced.stderr and model.stat().st_mtime_ns != stamp


def test_version_and_an_unknown_spec_in_report(tmp_path):
    version = wbsweep("--version")
    assert version.returncode == 0 and re.match(r"wbsweep \S+", version.stdout)
    # no rows and no spec of that name: the unknown name, not "run it first"
    (tmp_path / "results").mkdir()
    assert_user_error(wbsweep("report", "fig9", "--out", str(tmp_path)), "unknown spec 'fig9'")


def test_the_exception_chain_is_walked_outermost_first_and_each_once():
    from trainables.errors import exception_chain

    inner = ValueError("inner")
    middle = RuntimeError("middle")
    middle.__cause__ = inner
    outer = KeyError("outer")
    outer.__context__ = middle
    assert list(exception_chain(outer)) == [outer, middle, inner]
    inner.__context__ = outer  # a chain that loops back ends instead of cycling
    assert list(exception_chain(outer)) == [outer, middle, inner]
    assert list(exception_chain(None)) == []
