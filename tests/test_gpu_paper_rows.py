"""bench/gpu_paper_rows.py: Table 8's paper-scale rows on a GPU machine that has no Ray, Optuna,
MLflow, pandas or pyarrow. Its configs must be the very ones a sweep's repeat stage trains (same
resolved config, same config hash), and it must run with those libraries absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_paper_rows as gpr
from bench.fake_cifar import write as write_cifar
from orchestrator.spec.experiment import load_experiment
from orchestrator.sweep.driver import Sweep, SweepOptions
from orchestrator.sweep.graph import trial_members
from trainables.config import config_hash
from trainables.datacache import dataset_fingerprint
from trainables.trial import training_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_paper_rows.py"
FORBIDDEN = ("ray", "optuna", "mlflow", "pandas", "pyarrow")
# Runs the script as `python bench/gpu_paper_rows.py ARGS` with the libraries absent, as on the GPU
# machine: a None in sys.modules makes `import pandas` raise ModuleNotFoundError and
# importlib.util.find_spec("pandas") return None (how optional imports probe), as when not installed.
BLOCKED_RUN = f"""
import runpy, sys
FORBIDDEN = {FORBIDDEN!r}
for name in FORBIDDEN:
    sys.modules[name] = None
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    assert all(sys.modules[name] is None for name in FORBIDDEN)
"""


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A data root with a random-pixel CIFAR-10 in the real format (bench/fake_cifar.py)."""
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar(root, 10)
    return root


def sweep_trial_configs(tmp_path: Path, root: Path, offline_graph, wanted: set[tuple[str, int]]) -> dict:
    """The trial configs the sweep's own stage graph hands Ray Tune for ``wanted`` (method, seed) of
    the table8 paper preset, one model per trial (fuse off), keyed like ``wanted``."""
    out = tmp_path / "sweep"
    sweep = Sweep(load_experiment("table8", "paper"),
                  SweepOptions(out=out, tracking_uri=f"sqlite:///{out}/mlflow.db", data_root=str(root), fuse="off",
                               quiet=True))
    graph = offline_graph(sweep)
    found = {}
    for i in range(200):
        config = graph.suggest(f"t{i}")
        if config is None:
            break
        for _, member in trial_members(f"t{i}", config):
            stage, seed = member["_stage"], member["seed"]
            method = stage.split(":", 1)[1]
            if stage.startswith("repeat:") and (method, seed) in wanted:
                found[(method, seed)] = member
    assert set(found) == wanted, f"the sweep handed out {sorted(found)}"
    return found


def test_the_script_trains_the_sweeps_repeat_configs(tmp_path: Path, fake_root: Path, offline_graph) -> None:
    """For naive and wd_fr_etf at seeds 0 and 1 the script's resolved config is the one the sweep's
    repeat stage hands its trial (after training_config), key for key, and so is the config hash;
    a dry run's (fewer epochs) is not, and the record says so."""
    wanted = {(m, s) for m in gpr.METHODS for s in (0, 1)}
    sweep = sweep_trial_configs(tmp_path, fake_root, offline_graph, wanted)
    exp = load_experiment(gpr.SPEC, gpr.PRESET)
    fingerprint = dataset_fingerprint("cifar10-lt", str(fake_root), None, 20, "file")
    machine = gpr.sweep_machine(exp, fake_root, fingerprint, "auto")  # the sweep's default device
    hashes = set()
    for method, seed in sorted(wanted):
        ours = gpr.repeat_config(exp, method, seed, machine, tmp_path / "work" / "runs")
        theirs = training_config(sweep[(method, seed)])
        assert ours == theirs, {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs)
                                if ours.get(k) != theirs.get(k)}
        assert config_hash(ours) == config_hash(theirs)
        hashes.add(config_hash(ours))
        assert (ours["wd"], ours["fr"], ours["epochs"], ours["model"]) == (
            (0.0, 0.0, 320, "resnet34") if method == "naive" else (5e-3, 2e-2, 320, "resnet34"))
    assert len(hashes) == 2  # one config per method; the seed is not hashed
    on_gpu = gpr.repeat_config(exp, "naive", 0, gpr.sweep_machine(exp, fake_root, fingerprint, "cuda"), "/x")
    assert config_hash(on_gpu) == config_hash(training_config(sweep[("naive", 0)]))  # device: not hashed


def test_the_script_runs_without_the_sweeps_libraries(tmp_path: Path, fake_root: Path, capsys) -> None:
    """A tiny dry run (1 epoch, ~10 images, the two methods fused) with ray, optuna, mlflow, pandas
    and pyarrow absent: it finishes and writes the rows, the models' metrics with both hashes, the
    progress. Then (in this process) a second run reuses the finished models, and data that are not
    CIFAR-10-LT are refused in one line without --allow-other-data."""
    base = ["--device", "cpu", "--threads", "1", "--data-root", str(fake_root), "--work", str(tmp_path / "work")]
    dry = [*base, "--epochs", "1", "--images", "10", "--allow-other-data"]
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, *dry, "--out", str(tmp_path / "a"), "--fused"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "a" / gpr.ROWS_FILE).read_text())
    assert doc["state"] == "finished" and doc["dry_run"] and doc["fusion_key_equal"]
    assert {(r["method"], r["la"]) for r in doc["rows"]} == {(m, la) for m in gpr.METHODS for la in gpr.LA}
    naive_add = next(r for r in doc["rows"] if (r["method"], r["la"]) == ("naive", "add"))
    assert naive_add["paper"] is None and not naive_add["in_spec"]  # Table 8 prints naive without LA only
    for model in doc["models"]:
        metrics = json.loads((tmp_path / "a" / f"{model['method']}-s0" / "metrics.json").read_text())
        record = metrics["paper_rows"]
        assert record["config_hash"] == metrics["config_hash"] != record["sweep_config_hash"]  # 1 epoch, a subset
        assert not record["same_as_sweep"] and metrics["fused_k"] == 2 and set(metrics["la"]) == set(gpr.LA)
        assert not (tmp_path / "a" / f"{model['method']}-s0" / "history.jsonl").exists()  # in metrics.json
    log = (tmp_path / "a" / "progress.log").read_text()
    assert "naive-s0 epoch 1/1" in log and "wd_fr_etf-s0 trained fused K=2" in log

    assert gpr.main([*dry, "--out", str(tmp_path / "b")]) == 0
    assert "naive-s0 reused" in (tmp_path / "b" / "progress.log").read_text()
    capsys.readouterr()
    assert gpr.main([*base, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and gpr.FULL_FINGERPRINT in err and "Traceback" not in err
    assert not (tmp_path / "c" / gpr.ROWS_FILE).exists()
    assert gpr.main([*dry, "--out", str(tmp_path / "a")]) == 2  # a run's rows are never overwritten
    assert "already holds" in capsys.readouterr().err


def test_full_cifar10_gives_the_recorded_fingerprint(real_cifar10_root: Path) -> None:
    """FULL_FINGERPRINT, which the script requires, is the real CIFAR-10-LT's as the sweep computes it."""
    assert dataset_fingerprint("cifar10-lt", str(real_cifar10_root), None, 20, "file") == gpr.FULL_FINGERPRINT
