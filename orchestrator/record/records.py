"""The one reader (and writer) of a sweep's results folder while it runs.

A sweep reads ``results/`` once, at its start, and keeps it indexed: which models of this spec and
preset have rows (their config hash and seed, per method), and the rows themselves (the repeat
stages' summaries in MLflow are computed from them). Every row the sweep writes goes through here
too, so the index never needs a second read. A model's files (``runs/<config hash>/seed<k>/``) are
read on demand: its metrics (finished or not) and its small text files (``mlflow_run_id``,
``ray_node_id``); a model known to be finished is never read again.

Results and run folders may live in a local folder or an object store (:mod:`trainables.storage`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow as pa

from orchestrator.record.results import SCHEMA, read_rows, rows_for_run, write_rows
from trainables import storage
from trainables.storage import run_location
from trainables.trial import finished_metrics

RESULTS, TRIALS = "results", "trials"


def row_file_name(spec: str, preset: str, method: str, config_hash: str, seed: int) -> str:
    """The name of the Parquet file of one model's rows: one file per spec, preset, method and
    model, so another preset reusing the model writes its own file and no two writers share one."""
    return f"{spec}-{preset}-{method}-{config_hash}-s{seed}"


class SweepRecords:
    """The results folder of one spec and preset, as the sweep sees it (see the module docstring).
    Reading ``results/`` here raises the one-line error of a torn file before anything runs."""

    def __init__(self, store: str, spec: str, preset: str, versions: dict[str, Any]):
        self.store, self.spec, self.preset, self.versions = store, spec, preset, versions
        self.runs = storage.join(store, "runs")
        self.at_start = read_rows(self.location(RESULTS))  # every spec's rows, as found
        self._written: list[dict[str, Any]] = []  # rows this sweep wrote to results/
        self._models: dict[str, set[tuple[str, int]]] = {}  # method -> (config hash, seed) with rows
        mine = self.at_start[(self.at_start["spec"] == spec) & (self.at_start["preset"] == preset)]
        for method, hash_, seed in zip(mine["method"], mine["config_hash"], mine["seed"].astype(int), strict=True):
            self._models.setdefault(method, set()).add((hash_, seed))
        self._finished: dict[tuple[str, int], dict[str, Any]] = {}  # models known to be finished

    def location(self, *parts: str) -> str:
        """A location under the sweep's storage (``results``, ``trials``, ``analyses``, ...)."""
        return storage.join(self.store, *parts)

    # --- rows ----------------------------------------------------------------------------------
    def has_rows(self, method: str, config_hash: str, seed: int) -> bool:
        """Whether this spec and preset's ``method`` has the rows of the model (hash, seed)."""
        return (config_hash, int(seed)) in self._models.get(method, ())

    def rows(self, method: str, hashes: set[str], seeds: list[int]) -> pd.DataFrame:
        """This spec and preset's rows of ``method`` for the models ``hashes`` x ``seeds``: those found
        at the start and those written since."""
        df = self.at_start
        if self._written:
            df = pd.concat([df, pa.Table.from_pylist(self._written, schema=SCHEMA).to_pandas()], ignore_index=True)
        return df[(df["spec"] == self.spec) & (df["preset"] == self.preset) & (df["method"] == method)
                  & df["config_hash"].isin(hashes) & df["seed"].isin(seeds)]

    def model_rows(self, stage: str, method: str, cfg: dict[str, Any], metrics: dict[str, Any],
                   run_id: str | None) -> list[dict[str, Any]]:
        """The rows of a finished model (one per LA variant): see :func:`~orchestrator.record.results.rows_for_run`."""
        return rows_for_run(metrics, cfg, spec=self.spec, preset=self.preset, method=method, stage=stage,
                            mlflow_run_id=run_id, versions=self.versions,
                            created_at=pd.Timestamp.now(tz="UTC").floor("s"))

    def write(self, stage: str, method: str, cfg: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Write one model's rows: ``results/`` for a repeat stage, ``trials/`` for a tune stage."""
        hash_, seed = rows[0]["config_hash"], int(cfg["seed"])
        folder = RESULTS if stage == "repeat" else TRIALS
        write_rows(self.location(folder), row_file_name(self.spec, self.preset, method, hash_, seed), rows)
        if folder == RESULTS:
            self._written += rows
            self._models.setdefault(method, set()).add((hash_, seed))

    # --- run folders ---------------------------------------------------------------------------
    def finished(self, config_hash: str, seed: int) -> dict[str, Any] | None:
        """The metrics of a finished model, or None when it is not finished (read from the storage
        until it is; then kept)."""
        key = (config_hash, int(seed))
        if key not in self._finished:
            metrics = finished_metrics(self.runs, config_hash, seed)
            if metrics is None:
                return None
            self._finished[key] = metrics
        return dict(self._finished[key])

    def run_file(self, config_hash: str, seed: int, name: str) -> str | None:
        """A small text file of a model's run folder (``mlflow_run_id``, ``ray_node_id``), or None."""
        data = storage.read_bytes(storage.join(run_location(self.runs, config_hash, seed), name))
        return data.decode().strip() if data is not None else None

    def write_run_file(self, config_hash: str, seed: int, name: str, text: str) -> None:
        storage.write_bytes(storage.join(run_location(self.runs, config_hash, seed), name), text.encode())
