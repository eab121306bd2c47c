"""MLflow layout: an experiment per spec, a parent run per stage, a child run per trained model.

All logging happens in the driver through an explicit :class:`MlflowClient` (no global active run),
from Ray Tune callbacks: the workers never open the tracking store, so a SQLite store works with
many concurrent trials and a remote tracking server needs to be reachable from the driver only.
Runs are found again by their tags, so a resumed sweep re-attaches to its runs instead of
duplicating them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trainables.errors import WbsweepError


def default_tracking_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


class Tracker:
    """Thin wrapper around MlflowClient for the runs of one spec."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None):
        from mlflow import MlflowClient

        self.uri = tracking_uri
        try:
            self.client = MlflowClient(tracking_uri)  # opens (and migrates) a SQLite store: a torn one fails here
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = artifact_root.resolve().as_uri() if artifact_root is not None else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = exp.experiment_id
        except Exception as exc:  # any failure to reach or open the store is the user's to fix
            raise WbsweepError(f"cannot use the MLflow tracking store {tracking_uri}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def _find(self, tags: dict[str, str]) -> str | None:
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1)
        return runs[0].info.run_id if runs else None

    def run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """The run with these identifying ``tags``, created if it does not exist yet."""
        found = self._find(tags)
        if found:
            # a resumed stage, or a model whose training was interrupted, is running again
            self.client.update_run(found, status="RUNNING")
            return found
        all_tags = dict(tags)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def running_model_runs(self) -> list[tuple[str, str, int]]:
        """(run id, config hash, seed) of the model runs still marked RUNNING: at the start of a
        sweep, those a driver that died (kill -9, a lost head node) left behind."""
        runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                       max_results=5000)
        return [(r.info.run_id, r.data.tags["wbsweep.config_hash"], int(r.data.tags["wbsweep.seed"]))
                for r in runs if "mlflow.parentRunId" in r.data.tags and "wbsweep.config_hash" in r.data.tags]

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in sorted(params.items()) if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and v == v]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_artifacts(self, run_id: str, folder: Path) -> None:
        self.client.log_artifacts(run_id, str(folder))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
