"""The spec-level MLflow run ``report <preset>`` (tag ``wbsweep.kind=report``), made at the end of
``wbsweep run`` and of ``wbsweep report``: the report's table (MLflow's table artifact
``report_table.json`` and ``report.csv``), its text, its figures and the claims file written by
``report --claims``. Re-attached, not duplicated, on a rerun (see docs/mlflow.md).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pandas as pd

from orchestrator.tracking.tracker import Tracker, first_line, quiet_store_errors
from trainables.errors import disk_full_cause


def log_report_run(tracking_uri: str, out: Path, store: str, spec: str, preset: str, text: str,
                   table_csv: str | None) -> str:
    """The spec-level run ``report <preset>`` of ``spec``'s experiment (made, or re-attached): the
    report's text and table, the figures ``out/figures/<spec>-<preset>-*.png`` and the claims of
    ``store/claims/<spec>-<preset>.csv``. Its id."""
    import tempfile

    from trainables import storage

    local = not tracking_uri.startswith(("http://", "https://"))
    tracker = Tracker(tracking_uri, spec, out / "mlartifacts" if local else None)
    client = tracker.client
    run_id = tracker.run(f"report {preset}", {"wbsweep.kind": "report", "wbsweep.preset": preset})
    try:
        drop_artifacts(tracker, run_id, ["report_table.json", "claims_table.json"])  # log_table appends
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "report.txt").write_text(text)
            if table_csv:
                (folder / "report.csv").write_text(table_csv)
                client.log_table(run_id, data=pd.read_csv(io.StringIO(table_csv)), artifact_file="report_table.json")
            claims = storage.read_bytes(storage.join(store, "claims", f"{spec}-{preset}.csv"))
            if claims:
                (folder / "claims.csv").write_bytes(claims)
                client.log_table(run_id, data=pd.read_csv(io.BytesIO(claims)), artifact_file="claims_table.json")
            client.log_artifacts(run_id, str(folder))
        figures = sorted((out / "figures").glob(f"{spec}-{preset}-*.png"))
        for fig in figures:
            client.log_artifact(run_id, str(fig), artifact_path="figures")
        tracker.finish(run_id)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def attach_claims(tracking_uri: str, out: Path, spec: str, preset: str, claims: pd.DataFrame) -> str:
    """The claims of ``report --claims`` in the spec-level run ``report <preset>`` (made, or
    re-attached; the table replaced): ``claims_table.json`` and ``claims.csv``. Its id."""
    import tempfile

    local = not tracking_uri.startswith(("http://", "https://"))
    tracker = Tracker(tracking_uri, spec, out / "mlartifacts" if local else None)
    run_id = tracker.run(f"report {preset}", {"wbsweep.kind": "report", "wbsweep.preset": preset})
    try:
        drop_artifacts(tracker, run_id, ["claims_table.json"])
        tracker.client.log_table(run_id, data=claims, artifact_file="claims_table.json")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "claims.csv").write_text(claims.to_csv(index=False))
            tracker.client.log_artifact(run_id, str(Path(tmp) / "claims.csv"))
        tracker.finish(run_id)
    except Exception:
        tracker.client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def drop_artifacts(tracker: Tracker, run_id: str, paths: list[str]) -> None:
    """Delete ``paths`` from a run's artifacts where the store allows it (so a rerun replaces them)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    have = {a.path for a in tracker.client.list_artifacts(run_id)}
    repo = get_artifact_repository(tracker.client.get_run(run_id).info.artifact_uri)
    for p in paths:
        if p in have:
            with contextlib.suppress(Exception):  # a store that cannot delete: the table is appended to
                repo.delete_artifacts(p)


def report_to_mlflow(tracking_uri: str | None, out: Path, store: str, spec: str, preset: str | None,
                     text: str, table_csv: str | None, log) -> None:
    """:func:`log_report_run` where there is a store; a failure is one line (the report stands)."""
    if not tracking_uri:
        return
    from orchestrator.record.results import read_rows
    from orchestrator.report.selection import spec_rows
    from trainables import storage

    quiet_store_errors()
    try:
        if preset is None:
            _, preset = spec_rows(read_rows(storage.join(store, "results")), spec, None)
        run_id = log_report_run(tracking_uri, out, store, spec, preset, text, table_csv)
        log(f"report logged to MLflow ({tracking_uri}), run {run_id}")
    except Exception as exc:  # noqa: BLE001 - MLflow is a view: the report is printed regardless
        again = "; free space there and run the same command again" if disk_full_cause(exc) is not None else ""
        log(f"WARNING report not logged to MLflow: {first_line(exc)}{again}")
