"""The Ray Tune trainable: one trial = one call of :func:`trainables.train.train`.

Trial configs carry the training config plus bookkeeping keys that start with "_": ``_runs`` (where
every trained model lives, at ``_runs/<config_hash>/seed<seed>/``: a folder or an object-store URI,
see :mod:`trainables.storage`) and ``_stage`` (the sweep stage that asked for the trial). A model
already finished there is not trained again: its metrics are re-reported, so a repeated or resumed
sweep costs nothing for work that is done.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainables import storage
from trainables.config import config_hash, objective, resolve_config
from trainables.storage import run_dir, run_location
from trainables.train import CHECKPOINT, TrainingDiverged, load_metrics, train


def training_config(trial_config: dict[str, Any]) -> dict[str, Any]:
    """The resolved training config of a trial (bookkeeping keys removed, parent path filled in)."""
    cfg = {k: v for k, v in trial_config.items() if not k.startswith("_")}
    if cfg.get("stage2") and not cfg.get("init_from"):
        cfg["init_from"] = str(run_dir(trial_config["_runs"], cfg["parent_hash"], cfg["seed"]) / "model.pt")
    return resolve_config(cfg)


def finished_metrics(runs: str | Path, hash_: str, seed: int) -> dict[str, Any] | None:
    """The metrics of a finished model (read from the storage), or None when it is not finished."""
    return load_metrics(run_location(runs, hash_, seed))


# Files a trainer copies to an object store while it trains, so that a retry elsewhere resumes.
PROGRESS_FILES = [CHECKPOINT, "attempts.log", "ray_node_id"]
# A second stage's copy of its parent's model.pt in its scratch folder (object stores only).
PARENT_MODEL = ".parent-model.pt"


class ThrottledReport:
    """Per-epoch reports to Ray Tune, at most one every ``interval`` seconds.

    A report blocks the trial until the driver has taken it (about 10 ms here), which at hundreds
    of short epochs costs several percent of a trial; the final report carries every epoch's
    numbers, so nothing is lost. Tune wants the objective in every report: per epoch it is the
    validation accuracy so far."""

    def __init__(self, report: Callable[[dict[str, Any]], None], interval: float = 1.0):
        self.report, self.interval, self.last = report, interval, -float("inf")

    def __call__(self, epoch_metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.report({**epoch_metrics, "objective": epoch_metrics["val_acc"]})
            self.last = now


def tune_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: per-epoch reports, then one final report with every metric."""
    import ray
    from ray import tune

    cfg = training_config(config)
    runs, hash_, seed = config["_runs"], config_hash(cfg), cfg["seed"]
    out, home = run_dir(runs, hash_, seed), run_location(runs, hash_, seed)
    storage.download(home, out)  # object store: a retry (on any node) resumes from its checkpoint
    metrics = load_metrics(out)
    if metrics is None:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.get("stage2") and storage.is_remote(runs):  # the first stage's model, from the object store
            parent = storage.read_bytes(storage.join(run_location(runs, cfg["parent_hash"], seed), "model.pt"))
            if parent is None:
                raise FileNotFoundError(f"the first stage's model of seed {seed} is not in {runs}")
            (out / PARENT_MODEL).write_bytes(parent)  # init_from is not hashed: where it lies is ours to say
            cfg["init_from"] = str(out / PARENT_MODEL)
        with open(out / "attempts.log", "a") as fh:  # one line per training attempt (retries, resumes)
            fh.write(f"{time.time():.3f} pid {os.getpid()}\n")
        # Which Ray node trained it (hostnames can repeat: several nodes per machine, containers).
        (out / "ray_node_id").write_text(ray.get_runtime_context().get_node_id())
        storage.upload(out, home, ["attempts.log", "ray_node_id"])
        try:
            metrics = train(cfg, out, report=ThrottledReport(tune.report),
                            on_checkpoint=lambda: storage.upload(out, home, PROGRESS_FILES))
        except TrainingDiverged as exc:
            # Not a crash to retry (it would diverge again): end the trial with the reason.
            tune.report({"objective": float("nan"), "diverged": str(exc)})
            return
        finally:
            (out / PARENT_MODEL).unlink(missing_ok=True)  # a copy: the parent's folder has the original
    # Analyses before the final report, so the driver logs their files with the run's artifacts; not
    # for tune-stage trials: only the chosen config's models are analysed (`wbsweep run` fills in
    # the chosen trial's own model at the end, from its checkpoint).
    if cfg["analyses"] and not str(config.get("_stage", "")).startswith("tune"):
        from trainables.analysis import ensure_run_analyses

        ensure_run_analyses(out, cfg["analyses"], device=cfg["device"], data_root=cfg["data_root"])
    # A model trained for another spec holds every LA variant; this trial's objective is its own list's.
    final = {**metrics, "objective": objective(metrics, cfg["la"])}  # with the per-epoch history, for MLflow
    node_file = out / "ray_node_id"
    final["ray_node_id"] = node_file.read_text() if node_file.exists() else None
    storage.finish_upload(out, home)  # object store: the finished folder (metrics.json last), scratch removed
    tune.report({"objective": final["objective"], "final": final})
