"""The Ray Tune trainable: one trial = one call of :func:`trainables.train.train`.

Trial configs carry the training config plus bookkeeping keys that start with "_": ``_runs`` (the
folder where every trained model lives, at ``_runs/<config_hash>/seed<seed>/``) and ``_stage`` (the
sweep stage that asked for the trial). A model already finished there is not trained again: its
metrics are re-reported, so a repeated or resumed sweep costs nothing for work that is done.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainables.config import config_hash, resolve_config
from trainables.train import TrainingDiverged, load_metrics, train


def training_config(trial_config: dict[str, Any]) -> dict[str, Any]:
    """The resolved training config of a trial (bookkeeping keys removed, parent path filled in)."""
    cfg = {k: v for k, v in trial_config.items() if not k.startswith("_")}
    if cfg.get("stage2") and not cfg.get("init_from"):
        cfg["init_from"] = str(run_dir(trial_config["_runs"], cfg["parent_hash"], cfg["seed"]) / "model.pt")
    return resolve_config(cfg)


def run_dir(runs: str | Path, hash_: str, seed: int) -> Path:
    return Path(runs) / hash_ / f"seed{seed}"


def run_dir_of(trial_config: dict[str, Any]) -> Path:
    cfg = training_config(trial_config)
    return run_dir(trial_config["_runs"], config_hash(cfg), cfg["seed"])


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
    out = run_dir(config["_runs"], config_hash(cfg), cfg["seed"])
    metrics = load_metrics(out)
    if metrics is None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "attempts.log", "a") as fh:  # one line per training attempt (retries, resumes)
            fh.write(f"{time.time():.3f} pid {os.getpid()}\n")
        # Which Ray node trained it (hostnames can repeat: several nodes per machine, containers).
        (out / "ray_node_id").write_text(ray.get_runtime_context().get_node_id())
        try:
            metrics = train(cfg, out, report=ThrottledReport(tune.report))
        except TrainingDiverged as exc:
            # Not a crash to retry (it would diverge again): end the trial with the reason.
            tune.report({"objective": float("nan"), "diverged": str(exc)})
            return
    if cfg["analyses"]:  # before the final report, so the driver logs their files with the run's artifacts
        from trainables.analysis import ensure_run_analyses

        ensure_run_analyses(out, cfg["analyses"], device=cfg["device"], data_root=cfg["data_root"])
    final = dict(metrics)  # with the per-epoch history, which the driver logs to MLflow
    node_file = out / "ray_node_id"
    final["ray_node_id"] = node_file.read_text() if node_file.exists() else None
    tune.report({"objective": metrics["objective"], "final": final})
