"""MLflow runs left RUNNING by a driver that died are ended when the next sweep starts."""

from __future__ import annotations

import json

from orchestrator.callbacks import close_interrupted_runs
from orchestrator.tracking import Tracker


def test_runs_of_a_dead_driver_end_finished_or_killed(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "table4", tmp_path / "mlartifacts")
    parent = tracker.run("tune/wd", {"wbsweep.stage": "tune", "wbsweep.method": "wd"})
    done = tracker.run("wd seed0", {"wbsweep.config_hash": "aaa", "wbsweep.seed": "0"}, parent=parent)
    lost = tracker.run("wd seed0 t2", {"wbsweep.config_hash": "bbb", "wbsweep.seed": "0"}, parent=parent)
    ended = tracker.run("wd seed1", {"wbsweep.config_hash": "aaa", "wbsweep.seed": "1"}, parent=parent)
    tracker.finish(ended)
    runs = tmp_path / "runs"
    folder = runs / "aaa" / "seed0"  # this model finished after its driver died
    folder.mkdir(parents=True)
    metrics = {"fdr_train": 2.0, "fdr_test": 1.0, "objective": 50.0, "best_epoch": 3, "train_seconds": 9.0,
               "epochs": 4, "la": {"none": {"param": None, "val_acc": 50.0, "many": 1.0, "medium": 2.0,
                                             "few": 3.0, "avg": 2.0}}}
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "metrics.json").write_text(json.dumps(metrics))

    close_interrupted_runs(tracker, str(runs))

    get = tracker.client.get_run
    assert get(done).info.status == "FINISHED" and get(done).data.metrics["fdr_test"] == 1.0
    assert {a.path for a in tracker.client.list_artifacts(done)} == {"metrics.json", "model.pt"}
    assert get(lost).info.status == "KILLED" and "interrupted" in get(lost).data.tags["wbsweep.error"]
    assert get(ended).info.status == "FINISHED" and "wbsweep.error" not in get(ended).data.tags
    assert get(parent).info.status == "RUNNING"  # a stage's run: its resumed stage takes it over
    # the lost model trained later re-attaches to its run, which runs again
    assert tracker.run("wd seed0 t2", {"wbsweep.config_hash": "bbb", "wbsweep.seed": "0"}, parent=parent) == lost
    assert get(lost).info.status == "RUNNING"
