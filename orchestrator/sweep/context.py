"""What the parts of a running sweep share: one small object, built by the driver before anything runs.

The stage graph, the trial callback, the stage runs in MLflow and the watchdog each receive a
:class:`SweepContext` instead of the driver: the experiment, where things are (``out``, the
records of the results folder), what every training config gets from this sweep (``machine``),
the per-trial resources, the progress and status file, MLflow's tracker and outbox, the Optuna
storage, the scheduler, the listeners of the stage events and the results folder's lock. Every
field is set when it is made; nothing in it refers back to the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.record.folder_lock import FolderLock
from orchestrator.record.records import SweepRecords
from orchestrator.spec.configs import trial_config
from orchestrator.spec.experiment import Experiment
from orchestrator.sweep.events import EventList
from orchestrator.sweep.progress import Progress
from orchestrator.sweep.scheduler import StageScheduler
from orchestrator.sweep.status import StatusFile
from orchestrator.tracking.tracker import Tracker


@dataclass(frozen=True)
class SweepContext:
    exp: Experiment
    out: Path  # this machine's folder: the status files, optuna.db, stages/, a local MLflow store
    records: SweepRecords  # the results folder (maybe remote): rows, run folders
    machine: dict[str, Any]  # what a training config gets from this sweep: device, threads, data_root, data_fingerprint
    cpus: float  # per trial
    gpus: float
    autoscaling: bool  # the Ray cluster adds nodes on demand
    progress: Progress
    status: StatusFile
    tracker: Tracker | None  # None: no tracking (a graph driven without MLflow, as tests do)
    outbox: Callable[[str, Callable[[], object]], None]  # defers a tracking call: (what, call)
    events: EventList  # the stage events' listeners
    optuna_storage: Callable[[], Any]  # the RDB storage of every tune stage's study (opened on first use)
    scheduler: StageScheduler | None = None  # early stopping (None: FIFO)
    lock: FolderLock | None = None  # the results folder's lock, its heartbeat kept by the watchdog (None: none)

    @property
    def runs(self) -> str:
        """Where every model's folder lives: ``<storage>/runs/<config hash>/seed<k>``."""
        return self.records.runs

    def trial_config(self, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
        """A training config as a trial receives it (``_runs``: where the models live)."""
        return trial_config(cfg, seed, self.runs)

    def pruned_epoch(self, trial_id: str) -> int | None:
        """The epoch at which early stopping ended ``trial_id``, or None (not pruned)."""
        return None if self.scheduler is None else self.scheduler.pruned.get(trial_id)
