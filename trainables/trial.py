"""The Ray Tune trainable: one trial = one call of :func:`trainables.train.train`.

Trial configs carry the training config plus bookkeeping keys that start with "_": ``_runs`` (where
every trained model lives, at ``_runs/<config_hash>/seed<seed>/``: a folder or an object-store URI,
see :mod:`trainables.storage`) and ``_stage`` (the sweep stage that asked for the trial). A model
already finished there is not trained again: its metrics are re-reported, so a repeated or resumed
sweep costs nothing for work that is done.

A trial to which Ray gave GPUs fails (and is retried) when torch cannot use them, instead of
training on the CPU unnoticed; warnings raised while it runs go to its output (which Ray sends to the
driver), to ``warnings.log`` in its run folder and to the driver with its next report.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainables import storage
from trainables.config import config_hash, objective, resolve_config
from trainables.reports import (
    diverged_report,
    epoch_report,
    final_report,
    group_epoch_report,
    group_report,
    with_warnings,
)
from trainables.run_files import CHECKPOINT, load_metrics
from trainables.storage import run_dir, run_location
from trainables.train import TrainingDiverged, train


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

    def __init__(self, report: Callable[[dict[str, Any]], None], interval: float = 1.0, always=()):
        self.report, self.interval, self.last = report, interval, -float("inf")
        self.always = set(always)  # always reported: early stopping's rungs (orchestrator.spec.early_stopping)

    def __call__(self, epoch_metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval or epoch_metrics.get("epoch") in self.always:
            self.report(epoch_report(epoch_metrics))
            self.last = now


def check_gpu_usable(device: str, gpu_ids: list) -> None:
    """Raise RuntimeError when Ray gave this trial the GPUs ``gpu_ids`` and ``device`` (auto or cuda)
    wants one, but torch cannot use any (a driver too old for torch's CUDA, a CPU-only torch): the
    trial fails with the reason and Ray retries it, rather than training on the CPU unnoticed.
    ``device: cpu`` trains on CPUs on purpose and is never refused."""
    if not gpu_ids or device == "cpu":
        return
    import torch

    with warnings.catch_warnings(record=True) as caught:  # torch says why in a warning ("driver too old")
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    if usable:
        return
    reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    if not reasons:
        reasons = [f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"]
    ids = ",".join(str(i) for i in gpu_ids)
    raise RuntimeError(f"Ray gave this trial GPU {ids} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}) "
                       f"but torch cannot use it: {'; '.join(reasons)}. Install a torch whose CUDA this node's driver "
                       "runs, or train on CPUs on purpose with --device cpu --gpus-per-trial 0.")


class TrialWarnings:
    """Collects the warnings raised while a trial runs (``warnings.warn`` from torch or the trainer,
    under the default filters): each is printed to stderr at once, appended to ``warnings.log`` in
    the run folder (an artifact of its MLflow run) and kept for :meth:`take` (the next report)."""

    def __init__(self, folder: Path):
        self.folder, self.new = folder, []
        self._catch = warnings.catch_warnings()

    def __enter__(self) -> TrialWarnings:
        self._catch.__enter__()  # restores the previous showwarning on exit
        warnings.showwarning = self.show
        return self

    def __exit__(self, *exc) -> None:
        self._catch.__exit__(*exc)

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = f"{category.__name__}: {str(message).strip()} ({Path(filename).name}:{lineno})"
        print(f"wbsweep trial warning: {text}", file=sys.stderr, flush=True)
        self.new.append(text)
        try:
            with open(self.folder / "warnings.log", "a") as fh:
                fh.write(text + "\n")
        except OSError:  # the scratch folder of a finished upload is gone; the report still carries it
            pass

    def take(self) -> str:
        """The warnings since the last call, one a line ("" when none)."""
        text, self.new = "\n".join(self.new), []
        return text


class Member:
    """One model of a trial: its resolved config, where its run folder lives (``home``, maybe an
    object store) and where it trains (``out``, a local folder)."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.cfg = training_config(config)
        self.runs, self.hash, self.seed = config["_runs"], config_hash(self.cfg), self.cfg["seed"]
        self.out, self.home = run_dir(self.runs, self.hash, self.seed), run_location(self.runs, self.hash, self.seed)

    def open(self) -> dict[str, Any] | None:
        """Bring the run folder here (an object store: a retry, on any node, resumes from its
        checkpoint); the metrics when the model is finished already, else None after noting this
        training attempt (``attempts.log``) and the Ray node (``ray_node_id``)."""
        import ray

        storage.download(self.home, self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = load_metrics(self.out)
        if metrics is not None:
            return metrics
        with open(self.out / "attempts.log", "a") as fh:  # one line per training attempt (retries, resumes)
            fh.write(f"{time.time():.3f} pid {os.getpid()}\n")
        # Which Ray node trained it (hostnames can repeat: several nodes per machine, containers).
        (self.out / "ray_node_id").write_text(ray.get_runtime_context().get_node_id())
        storage.upload(self.out, self.home, ["attempts.log", "ray_node_id"])
        return None

    def fetch_parent(self) -> None:
        """A second stage's first-stage model (``init_from``), copied from an object store to its
        scratch folder (a shared folder's is read where it lies)."""
        cfg, seed = self.cfg, self.seed
        if cfg.get("stage2") and storage.is_remote(self.runs):
            parent = storage.read_bytes(storage.join(run_location(self.runs, cfg["parent_hash"], seed), "model.pt"))
            if parent is None:
                raise FileNotFoundError(f"the first stage's model of seed {seed} is not in {self.runs}")
            (self.out / PARENT_MODEL).write_bytes(parent)  # init_from is not hashed: where it lies is ours to say
            cfg["init_from"] = str(self.out / PARENT_MODEL)

    def drop_parent(self) -> None:
        """Remove the copy :meth:`fetch_parent` made (the parent's folder has the original)."""
        (self.out / PARENT_MODEL).unlink(missing_ok=True)

    def checkpointed(self) -> None:
        storage.upload(self.out, self.home, PROGRESS_FILES)

    def final(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The final report of the finished model: its analyses (repeat stages), its objective, its
        node; the folder uploaded (metrics.json last)."""
        cfg = self.cfg
        # Analyses before the final report, so the driver logs their files with the run's artifacts; not
        # for tune-stage trials: only the chosen config's models are analysed (`wbsweep run` fills in
        # the chosen trial's own model at the end, from its checkpoint).
        if cfg["analyses"] and not str(self.config.get("_stage", "")).startswith("tune"):
            from trainables.analysis import ensure_run_analyses

            ensure_run_analyses(self.out, cfg["analyses"], device=cfg["device"], data_root=cfg["data_root"])
        # A model trained for another spec holds every LA variant; this trial's objective is its own list's.
        final = {**metrics, "objective": objective(metrics, cfg["la"])}  # with the per-epoch history, for MLflow
        node_file = self.out / "ray_node_id"
        final["ray_node_id"] = node_file.read_text() if node_file.exists() else None
        storage.finish_upload(self.out, self.home)  # object store: the finished folder, scratch removed
        return final


def tune_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: per-epoch reports, then one final report with every metric.
    A config with ``_group`` is a fused group (:func:`train_group`)."""
    import ray

    if "_group" in config:
        return train_group(config)
    member = Member(config)
    check_gpu_usable(member.cfg["device"], ray.get_gpu_ids())
    member.out.mkdir(parents=True, exist_ok=True)
    with TrialWarnings(member.out) as caught:
        _train_and_report(member, caught)


def reporter(caught: TrialWarnings) -> Callable[[dict[str, Any]], None]:
    """Ray Tune's report, with the warnings raised since the last one."""
    from ray import tune

    def report(metrics: dict[str, Any]) -> None:
        news = caught.take()
        tune.report(with_warnings(metrics, news))

    return report


def _train_and_report(member: Member, caught: TrialWarnings) -> None:
    report = reporter(caught)
    cfg, out = member.cfg, member.out
    metrics = member.open()
    if metrics is None:
        member.fetch_parent()
        try:
            metrics = train(cfg, out, report=ThrottledReport(report, always=member.config.get("_report_epochs", ())),
                            on_checkpoint=member.checkpointed)
        except TrainingDiverged as exc:
            # Not a crash to retry (it would diverge again): end the trial with the reason.
            report(diverged_report(str(exc)))
            return
        finally:
            member.drop_parent()
    final = member.final(metrics)
    report(final_report(final))


def group_members(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The trial configs of the models a trial trains: those of its fused group, else its own."""
    return list(config["_group"]) if "_group" in config else [config]


def train_group(config: dict[str, Any]) -> None:
    """A fused group (``config["_group"]``: the trial configs of K models that
    :func:`trainables.fused.fusion_key` says share everything a fused step needs) as one trial:
    models finished already (before a crash, or by another sweep) are re-reported, the others are
    trained together by :func:`trainables.fused.train_fused`, each resuming from its own checkpoint.

    Reports (:mod:`trainables.reports`): per epoch a row per model (at most one report a second), then
    each model's final metrics, or the reason a model diverged (the others end normally)."""
    import ray

    from trainables.fused import train_fused

    members = [Member(m) for m in config["_group"]]
    check_gpu_usable(members[0].cfg["device"], ray.get_gpu_ids())
    members[0].out.mkdir(parents=True, exist_ok=True)
    with TrialWarnings(members[0].out) as caught:
        report = reporter(caught)
        results: dict[int, Any] = {i: m.open() for i, m in enumerate(members)}  # None: still to train
        todo = [i for i, metrics in results.items() if metrics is None]
        if todo:
            throttled = ThrottledReport(report)

            def per_epoch(rows: dict[int, dict[str, Any]]) -> None:
                throttled(group_epoch_report({todo[j]: r for j, r in rows.items()}))

            def checkpointed() -> None:
                for i in todo:
                    members[i].checkpointed()

            try:
                for i in todo:  # a second stage's parent model, from the object store
                    members[i].fetch_parent()
                trained = train_fused([members[i].cfg for i in todo], [members[i].out for i in todo],
                                      report=per_epoch, on_checkpoint=checkpointed)
            finally:
                for i in todo:
                    members[i].drop_parent()
            results.update(zip(todo, trained, strict=True))
        # per model its final metrics, or why its loss diverged (the others end normally)
        finals = {i: str(results[i]) if isinstance(results[i], TrainingDiverged) else m.final(results[i])
                  for i, m in enumerate(members)}
        report(group_report(finals))
