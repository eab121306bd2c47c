"""The analyses dataset: the numbers behind the paper's Table 3 and Figures 1-6, as Parquet.

Each trained model's ``analysis.json`` (trainables/analysis.py) becomes rows in ``DIR/analyses/``
(a sibling of ``DIR/results/``), one per number, in long format::

    spec, preset, dataset, model, method, seed, config_hash, analysis, key, i, j, label, value

``i``/``j`` are class indices (``class_cosine``: the pair; per-class analyses: the class) or the
layer index (``relu_fdr``, with the layer's name in ``label``); ``key`` says which number
(``before_test``, ``cos``, ``trained``, ``mean``, ``ratio``, ``class_count``, ...). For example::

    df = pd.read_parquet("wbsweep-out/analyses")
    df[(df.analysis == "feature_norms") & (df.key == "norms")].groupby(["method", "i"]).value.mean()

Rows are written per model as one file (temporary name + rename, like the results), by the
driver when a trial ends and by :func:`ensure_analyses`, which computes what is missing from the
checkpoints (a model trained earlier, by another spec, or before the spec asked for an analysis).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from orchestrator.record.results import read_rows, write_rows
from trainables import storage
from trainables.errors import WbsweepError
from trainables.run_files import one_line
from trainables.storage import run_location

FOLDER = "analyses"
SCHEMA = pa.schema([
    ("spec", pa.string()), ("preset", pa.string()), ("dataset", pa.string()), ("model", pa.string()),
    ("method", pa.string()), ("seed", pa.int64()), ("config_hash", pa.string()), ("analysis", pa.string()),
    ("key", pa.string()), ("i", pa.int64()), ("j", pa.int64()), ("label", pa.string()), ("value", pa.float64()),
    ("created_at", pa.timestamp("s", tz="UTC")),
])
COLUMNS = SCHEMA.names


def rows_for_result(result: dict[str, Any], *, spec: str, preset: str, method: str) -> list[dict[str, Any]]:
    """Long-format rows of one run's ``analysis.json`` (see the module docstring)."""
    from trainables.analysis import result_rows

    now = pd.Timestamp.now(tz="UTC").floor("s")
    base = {"spec": spec, "preset": preset, "dataset": result.get("dataset"), "model": result.get("model"),
            "method": method, "seed": int(result.get("seed", 0)), "config_hash": result.get("config_hash"),
            "created_at": now}
    return [{**base, **r} for r in result_rows(result)]


def write_analysis_rows(folder: str | Path, name: str, rows: list[dict[str, Any]]) -> Path | None:
    """Write ``rows`` as ``folder/name.parquet`` atomically, like the results (nothing if empty)."""
    return write_rows(folder, name, rows, SCHEMA) if rows else None


def read_analysis_rows(folder: str | Path) -> pd.DataFrame:
    """Every analysis row under ``folder``; a model analysed for several specs appears once per
    spec (filter on ``spec`` or join on ``config_hash`` and ``seed``)."""
    return read_rows(folder, SCHEMA, "analyses")


def file_name(spec: str, method: str, config_hash: str, seed: int) -> str:
    return f"{spec}-{method}-{config_hash}-s{seed}"


def record_run_analyses(store: str | Path, run_folder: Path, *, spec: str, preset: str, method: str) -> int:
    """Rows of the analyses a finished run folder holds, written under the sweep's storage
    ``store`` (none: nothing written); the count."""
    from trainables.analysis import load_result

    result = load_result(run_folder)
    if not result.get("analyses"):
        return 0
    rows = rows_for_result(result, spec=spec, preset=preset, method=method)
    name = file_name(spec, method, result["config_hash"], int(result["seed"]))
    write_analysis_rows(storage.join(store, FOLDER), name, rows)
    return len(rows)


def ensure_analyses(store: str | Path, spec: str, preset: str | None = None, names: Sequence[str] | None = None,
                    force: bool = False, device: str = "cpu", data_root: str | None = None,
                    tracking_uri: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, int]:
    """Make sure every model in ``store/results`` of ``spec`` (and ``preset``) has its analyses,
    as files in its run folder and as rows in ``store/analyses``: those of its config's
    ``analyses`` option, or ``names``. Missing ones are computed from the checkpoint (all of them
    with ``force``); new files are added to the model's MLflow run when ``tracking_uri`` is given.
    Returns counts: models looked at, analysed (computed), rows written, skipped (no checkpoint),
    failed: a model whose files are torn (a truncated ``model.pt``, ``forgetting.npz``) or whose
    analyses cannot be written (a full disk) is named in one ``log`` line and the others go on."""
    from trainables.analysis import ensure_run_analyses, load_result, run_analyses

    log = log or (lambda msg: None)
    runs = storage.join(store, "runs")
    df = read_rows(storage.join(store, "results"))
    df = df[df["spec"] == spec]
    if preset is not None:
        df = df[df["preset"] == preset]
    have = read_analysis_rows(storage.join(store, FOLDER))
    have = have[have["spec"] == spec]
    have_keys = set(zip(have["config_hash"], have["seed"].astype(int), have["analysis"], strict=True))
    counts = {"models": 0, "analysed": 0, "rows": 0, "skipped": 0, "failed": 0}
    client = None
    models = df.drop_duplicates(["config_hash", "seed"])
    for _, row in models.iterrows():
        cfg = json.loads(row["config"])
        wanted = list(names) if names else list(cfg.get("analyses") or [])
        if not wanted:
            continue
        counts["models"] += 1
        seed, hash_ = int(row["seed"]), row["config_hash"]
        home = run_location(runs, hash_, seed)
        # the run folder itself, or a temporary copy of an object store's (new analyses sent back below)
        with storage.local_copy(runs, hash_, seed) as folder:
            if not (folder / "model.pt").exists():
                counts["skipped"] += 1
                log(f"analyses: {home} has no model.pt; skipped")
                continue
            try:
                before = load_result(folder).get("analyses", {})
                if force:
                    result = run_analyses(folder, wanted, device=device, data_root=data_root)
                else:
                    result = ensure_run_analyses(folder, wanted, device=device, data_root=data_root)
                computed = force or any(n not in before for n in wanted)
                if computed:
                    counts["analysed"] += 1
                    log(f"analyses: {row['method']} seed {seed} ({hash_}): {', '.join(wanted)}")
                done = set(result.get("analyses", {}))
                if computed or any((hash_, seed, n) not in have_keys for n in done):
                    storage.upload(folder, home, [p.name for p in folder.glob("analysis*")])
                    counts["rows"] += record_run_analyses(store, folder, spec=spec, preset=row["preset"],
                                                          method=row["method"])
            except (WbsweepError, OSError) as exc:  # this model's files; the next model's may be fine
                counts["failed"] += 1
                why = str(exc) if isinstance(exc, WbsweepError) else f"cannot write its analyses ({one_line(exc)})"
                log(f"analyses: {row['method']} seed {seed} ({hash_}) not analysed: {why}")
                continue
            if computed and tracking_uri and isinstance(row.get("mlflow_run_id"), str):
                try:
                    if client is None:
                        from mlflow import MlflowClient

                        client = MlflowClient(tracking_uri)
                    for path in sorted(folder.glob("analysis*")):
                        client.log_artifact(row["mlflow_run_id"], str(path))
                except Exception as exc:  # the numbers are in Parquet either way; say what went wrong
                    log(f"analyses: could not add the files to MLflow run {row['mlflow_run_id']}: {exc}")
    return counts
