"""A class the test split lacks has no recall: it is left out of Many/Medium/Few and the average,
and that is said (issue #23, item 10): one warning naming the class, which the trial reports (the
sweep's progress output, the model's warnings.log), ``classes_in_average`` in metrics.json and
results/, and a note under the table when it is fewer than the dataset's classes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import wbsweep

from orchestrator.record.results import SCHEMA, fewer_classes, read_rows
from trainables.evaluation import classes_in_average

SPEC = """name: nine
methods:
  - {method: wd, la: [none]}
presets:
  p:
    train: {dataset: mnist-lt, rho: 10, val_per_class: 5, model: mlp3, epochs: 1, width: 16}
    seeds: [0]
    resources: {fuse: "off"}
"""
LINE = "the test accuracies are averaged over 9 of 10 classes; the test split has no image of class 9."


@pytest.mark.slow
def test_a_class_without_test_images_is_named_and_counted(tmp_path: Path, make_mnist, ray_cluster) -> None:
    """MNIST-LT in its IDX files, class 9 without a test image: a real sweep."""
    data, out, spec = tmp_path / "data", tmp_path / "out", tmp_path / "nine.yaml"
    make_mnist(data / "mnist", 40, [5] * 9 + [0])
    spec.write_text(SPEC)
    proc = wbsweep("run", str(spec), "--out", str(out), "--data-root", str(data), "--address", ray_cluster.address,
                   env=ray_cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines()
            if line.startswith("WARNING repeat wd seed 0:") and "has no image of class 9" in line]
    assert len(said) == 1 and "averaged over 9 of 10 classes" in said[0]
    (run,) = (out / "runs").glob("*/seed0")
    assert "has no image of class 9" in (run / "warnings.log").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes_in_average"] == 9
    rows = read_rows(out / "results")
    assert rows["classes_in_average"].tolist() == [9]
    per_class = np.asarray(rows["acc_per_class"].iloc[0], dtype=float)
    assert np.isnan(per_class[9]) and rows["acc_avg"].iloc[0] == pytest.approx(np.nanmean(per_class))
    assert f"NOTE wd (mnist-lt, mlp3): {LINE}" in proc.stdout  # the table's note
    report = wbsweep("report", str(spec), "--out", str(out), "--data-root", str(data))
    assert report.returncode == 0 and f"NOTE wd (mnist-lt, mlp3): {LINE}" in report.stdout


def test_every_class_present_says_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert classes_in_average(np.array([0, 1, 2, 2]), 3, "x") == 3
    with pytest.warns(UserWarning, match="no image of class 1, 3: .* averaged over 2 of 4 classes"):
        assert classes_in_average(np.array([0, 2, 2]), 4, "x") == 2


def test_rows_written_before_the_column_are_read_from_their_per_class_recalls() -> None:
    rows = pd.DataFrame([dict.fromkeys(SCHEMA.names)] * 2)
    rows[["dataset", "model", "method"]] = ["mnist-lt", "mlp3", "wd"]
    rows["acc_per_class"] = [[50.0] * 9 + [float("nan")], [50.0] * 10]
    assert fewer_classes(rows) == [f"wd (mnist-lt, mlp3): {LINE}"]
    rows["acc_per_class"] = [[50.0] * 10] * 2
    assert fewer_classes(rows) == []
