"""Every kind of bad input gets one clear line, exit status 2, no traceback, and leaves the results
already in --out untouched. Table-driven: one case per mistake a user can make."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import digest, wbsweep

from orchestrator.cli import main
from orchestrator.record.results import rows_for_run, write_rows
from trainables.config import resolve_config

SPEC = """name: mine
methods:
  - {{method: {method}, la: [none]}}
presets:
  p:
    train: {{dataset: {dataset}, model: {model}, epochs: {epochs}, lr: {lr}, width: 16}}
    seeds: [0]
"""


def spec_file(tmp: Path, method="wd", dataset="digits-lt", model="mlp3", epochs="1", lr="0.01") -> str:
    path = tmp / "mine.yaml"
    path.write_text(SPEC.format(method=method, dataset=dataset, model=model, epochs=epochs, lr=lr))
    return str(path)


def truncated_cifar(tmp: Path) -> str:
    root = tmp / "data"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    blob = pickle.dumps({b"data": bytes(3072 * 10), b"labels": list(range(10))})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(blob)
    (folder / "data_batch_1").write_bytes(blob[: len(blob) // 3])
    return str(root)


def duplicate_preset(tmp: Path) -> str:
    """A spec whose preset p is written twice: the second (one epoch) would silently win."""
    path = Path(spec_file(tmp))
    text = path.read_text()
    path.write_text(text + text[text.index("  p:"):].replace("epochs: 1", "epochs: 40"))
    return str(path)


def file_path(tmp: Path) -> str:
    f = tmp / "a-file"
    f.write_text("x")
    return str(f)


# (id, argument builder (tmp, out) -> args, words the one line must contain)
CASES = [
    ("unknown-spec", lambda t, o: ["run", "tabel4", "--out", o], ["unknown spec", "table4"]),
    ("unknown-preset", lambda t, o: ["run", "table4", "--preset", "papr", "--out", o], ["paper"]),
    ("unknown-method", lambda t, o: ["run", spec_file(t, method="wd_etff"), "--out", o], ["wd_etf"]),
    ("unknown-dataset", lambda t, o: ["run", spec_file(t, dataset="cifar100-lr"), "--out", o], ["cifar100-lt"]),
    ("unknown-model", lambda t, o: ["run", spec_file(t, model="resnet43"), "--out", o], ["resnet34"]),
    ("malformed-spec", lambda t, o: ["run", spec_file(t, method="wd, la: [none"), "--out", o], ["mine.yaml:"]),
    ("duplicate-key", lambda t, o: ["run", spec_file(t, epochs="40, lr: 0.1, epochs: 2"), "--out", o],
     ["mine.yaml:6:", "'epochs' is given twice", "line 6"]),
    ("duplicate-key-nested", lambda t, o: ["run", duplicate_preset(t), "--out", o],
     ["mine.yaml:8:", "'p' is given twice", "line 5"]),
    ("wrong-type", lambda t, o: ["run", spec_file(t, epochs="ten"), "--out", o], ["epochs"]),
    ("out-of-range", lambda t, o: ["run", spec_file(t, lr="-0.1"), "--out", o], ["lr"]),
    ("missing-spec-file", lambda t, o: ["run", str(t / "nope.yaml"), "--out", o], ["nope.yaml", "does not exist"]),
    ("missing-data-root", lambda t, o: ["run", "table4", "--preset", "smoke", "--out", o, "--data-root",
                                        str(t / "nope")], ["--data-root"]),
    ("data-root-is-a-file", lambda t, o: ["run", "table4", "--preset", "smoke", "--out", o, "--data-root",
                                          file_path(t)], ["not a folder"]),
    ("truncated-dataset", lambda t, o: ["run", spec_file(t, dataset="cifar10-lt", model="resnet32"), "--out", o,
                                        "--data-root", truncated_cifar(t)], ["data_batch_1"]),
    ("out-is-a-file", lambda t, o: ["run", "table4", "--preset", "smoke", "--out", file_path(t)], ["is a file"]),
    ("out-not-creatable", lambda t, o: ["run", "table4", "--preset", "smoke", "--out", file_path(t) + "/sub"],
     ["cannot create"]),
    ("storage-is-a-file", lambda t, o: ["run", "table4", "--preset", "smoke", "--out", o, "--storage", file_path(t)],
     ["--storage", "is a file"]),
    ("storage-unknown-scheme", lambda t, o: ["run", "table4", "--preset", "smoke", "--out", o, "--storage",
                                             "nosuch://bucket/x"], ["cannot open storage", "nosuch://"]),
    ("unreachable-address", lambda t, o: ["run", "table4", "--preset", "smoke", "--out", o, "--address",
                                          "127.0.0.1:9"], ["cannot reach", "127.0.0.1:9"]),
    ("unreachable-tracking", lambda t, o: ["run", "table4", "--preset", "smoke", "--out", o, "--tracking-uri",
                                           "http://127.0.0.1:9"], ["cannot reach", "MLflow"]),
    ("gpu-without-gpus", lambda t, o: ["run", "table4", "--preset", "smoke", "--out", o, "--gpus-per-trial", "0.25"],
     ["no GPU"]),
    ("unknown-method-train", lambda t, o: ["train", "--method", "wbb", "--out", o], ["unknown method", "wb"]),
    ("bad-set", lambda t, o: ["train", "--method", "wd", "--set", "epochs", "--out", o], ["KEY=VALUE"]),
    ("report-unknown-format-spec", lambda t, o: ["report", "tabel4", "--out", o], ["tabel4"]),
    ("status-not-a-folder", lambda t, o: ["status", "--out", file_path(t)], ["not a results folder"]),
]


@pytest.fixture()
def out_with_results(tmp_path) -> Path:
    """An --out that already holds a results file of an earlier sweep."""
    out = tmp_path / "out"
    cfg = resolve_config({"la": ["none"]})
    metrics = {"config_hash": "abc", "fdr_train": 1.0, "fdr_test": 1.0, "objective": 50.0, "epochs": 1,
               "best_epoch": 1, "train_seconds": 1.0, "node": "n", "device": "cpu",
               "la": {"none": {"param": None, "val_acc": 50.0, "many": 1.0, "medium": 2.0, "few": 3.0, "avg": 2.0,
                               "acc_per_class": [2.0] * 10}}}
    rows = rows_for_run(metrics, cfg, spec="table4", preset="smoke", method="wd", stage="repeat", mlflow_run_id=None,
                        versions={"wbsweep": "x", "torch": "x", "ray": "x"},
                        created_at=pd.Timestamp("2026-01-01", tz="UTC"))
    write_rows(out / "results", "earlier", rows)
    return out


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind():
    yield
    import ray

    if ray.is_initialized():  # the GPU case starts a local cluster in this process
        ray.shutdown()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path, out_with_results, capsys):
    # In-process for speed (tests/test_cli.py checks the same contract through real subprocesses).
    _, build, words = case
    before = digest(out_with_results / "results")
    args = build(tmp_path, str(out_with_results))
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("wbsweep: error: "), err[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert digest(out_with_results / "results") == before


def test_a_foreign_file_in_results_is_named_and_nothing_runs(tmp_path, out_with_results):
    pd.DataFrame({"x": [1]}).to_parquet(out_with_results / "results" / "notes.parquet")
    before = digest(out_with_results / "results")
    proc = wbsweep("run", "table4", "--preset", "smoke", "--out", str(out_with_results), timeout=300)
    assert proc.returncode == 2 and "notes.parquet" in proc.stderr and "Traceback" not in proc.stderr
    assert digest(out_with_results / "results") == before
    assert not (out_with_results / "runs").exists()  # nothing was trained


@pytest.mark.parametrize("per_class", ["0,1,1", "1,1", "a,b,c", "5,-1,2"])
def test_data_prepare_per_class_is_checked_even_under_python_O(tmp_path, per_class):
    """--per-class was once checked with ``assert``, which ``python -O`` drops: the bad counts then
    reached the preparation. The check is a plain test now, under -O too."""
    root = tmp_path / "imagenet"
    root.mkdir()
    proc = subprocess.run([sys.executable, "-O", "-m", "orchestrator.cli", "data", "prepare", "mini-imagenet",
                           "--imagenet-root", str(root), "--out", str(tmp_path / "out"), "--per-class", per_class],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "write three positive counts" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
