"""What the stage graph says happened, for whoever listens (Ray Tune's callback style).

The graph (:mod:`orchestrator.sweep.graph`) decides; it does not log. When a stage starts, ends,
chooses a config or reuses a model trained earlier, it tells the sweep's :class:`StageEvents`, and
the listeners act: :class:`ProgressEvents` (the progress lines and the status file's stage states)
and :class:`orchestrator.sweep.stage_runs.StageRuns` (the stage's MLflow runs). A listener
overrides what it needs; every method is a no-op here.

``stage`` is the graph's node: ``stage.key`` (``tune:wd``), ``stage.label`` (``tune wd``),
``stage.kind``, ``stage.method``, ``stage.search`` (a tune stage's searched knobs).
"""

from __future__ import annotations

from typing import Any

from orchestrator.sweep.progress import Progress


class StageEvents:
    def on_stage_start(self, stage: Any) -> None:
        """The stage's inputs are ready and its trials may start."""

    def on_stage_end(self, stage: Any, failed: str | None) -> None:
        """The stage is done (``failed`` None) or failed with that reason."""

    def on_stage_stop(self, stage: Any, status: str, reason: str) -> None:
        """The sweep stops before this (waiting or running) stage is done: ``status`` KILLED (interrupted,
        stopped by the watchdog) or FAILED (an error). A resume continues it."""

    def on_choice(self, stage: Any, best: dict[str, Any], objective: float, searched: dict[str, Any]) -> None:
        """A tune stage chose: ``best`` is the chosen trial's trial config, ``searched`` its searched values."""

    def on_model_reused(self, stage: Any, trial_config: dict[str, Any], metrics: dict[str, Any],
                        source: str | None) -> None:
        """A repeat stage uses a model trained earlier (another stage's, spec's or run's), whose MLflow
        run is ``source``; its rows have just been written."""


class EventList(StageEvents):
    """Every listener, told in order."""

    def __init__(self, listeners: list[StageEvents] | None = None):
        self.listeners = list(listeners or [])

    def add(self, listener: StageEvents) -> None:
        self.listeners.append(listener)

    def on_stage_start(self, stage):
        for x in self.listeners:
            x.on_stage_start(stage)

    def on_stage_end(self, stage, failed):
        for x in self.listeners:
            x.on_stage_end(stage, failed)

    def on_stage_stop(self, stage, status, reason):
        for x in self.listeners:
            x.on_stage_stop(stage, status, reason)

    def on_choice(self, stage, best, objective, searched):
        for x in self.listeners:
            x.on_choice(stage, best, objective, searched)

    def on_model_reused(self, stage, trial_config, metrics, source):
        for x in self.listeners:
            x.on_model_reused(stage, trial_config, metrics, source)


class ProgressEvents(StageEvents):
    """Stages on the progress line and in the status file."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_stage_start(self, stage):
        self.progress.stage_started(stage.label)

    def on_stage_end(self, stage, failed):
        if failed is None:
            self.progress.stage_done(stage.label)
        else:
            self.progress.stage_failed(stage.label, failed)
