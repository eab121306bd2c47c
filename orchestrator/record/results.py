"""The Parquet results dataset: one row per (spec, dataset, model, method, LA, seed).

Each finished model writes its rows as one file, named by what it holds, to a temporary name that
is then renamed: a reader never sees a partial file and two writers never touch the same file, so
no row is lost. ``read_results(DIR / "results")`` (or ``pandas.read_parquet(DIR / "results",
schema=SCHEMA)``) reads the whole dataset, files of earlier versions with nulls in newer columns. Tune-stage trials
go to a sibling dataset ``DIR / "trials"`` with the same columns, so the results stay one row per
seed while every Optuna trial can still be queried.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from trainables import storage
from trainables.config import objective
from trainables.errors import WbsweepError

SCHEMA = pa.schema(
    [
        ("spec", pa.string()), ("preset", pa.string()), ("dataset", pa.string()), ("model", pa.string()),
        ("method", pa.string()), ("la", pa.string()), ("seed", pa.int64()), ("stage", pa.string()),
        ("config_hash", pa.string()), ("parent_hash", pa.string()),
        ("acc_many", pa.float64()), ("acc_medium", pa.float64()), ("acc_few", pa.float64()),
        ("acc_avg", pa.float64()), ("val_acc", pa.float64()), ("objective", pa.float64()),
        ("acc_per_class", pa.list_(pa.float64())),
        ("fdr_train", pa.float64()), ("fdr_test", pa.float64()),
        ("tau", pa.float64()), ("gamma", pa.float64()),
        ("wd", pa.float64()), ("fr", pa.float64()), ("stage2_wd", pa.float64()), ("bn_scale", pa.float64()),
        ("loss", pa.string()), ("classifier", pa.string()), ("wd_scope", pa.string()), ("bn", pa.string()),
        ("rho", pa.float64()), ("lr", pa.float64()), ("batch_size", pa.int64()),
        ("epochs", pa.int64()), ("best_epoch", pa.int64()), ("train_seconds", pa.float64()),
        ("node", pa.string()), ("ray_node_id", pa.string()), ("device", pa.string()), ("mlflow_run_id", pa.string()),
        ("wbsweep_version", pa.string()), ("torch_version", pa.string()), ("ray_version", pa.string()),
        ("created_at", pa.timestamp("s", tz="UTC")), ("config", pa.string()),
        ("data_fingerprint", pa.string()),
        ("git_commit", pa.string()), ("git_dirty", pa.bool_()), ("packages", pa.string()), ("pruned", pa.bool_()),
        ("fused_k", pa.int64()), ("classes_in_average", pa.int64()),
    ]
)
COLUMNS = SCHEMA.names
#: Columns added after results files existed: a file without them is read with nulls there.
ADDED_LATER = frozenset({"data_fingerprint", "git_commit", "git_dirty", "packages", "pruned", "fused_k",
                         "classes_in_average"})


def rows_for_run(
    metrics: dict[str, Any], cfg: dict[str, Any], *, spec: str, preset: str, method: str,
    stage: str, mlflow_run_id: str | None, versions: dict[str, str], created_at: pd.Timestamp,
) -> list[dict[str, Any]]:
    """One row per LA variant the config reports (``cfg["la"]``; the model's metrics hold them all).
    FDR is a property of the features, so it is the same on every LA row of a model. ``versions``
    is :func:`orchestrator.record.provenance.versions` (the code and package versions of the row)."""
    rows = []
    best = objective(metrics, cfg["la"])
    for la in cfg["la"]:
        r = metrics["la"][la]
        rows.append({
            "spec": spec, "preset": preset, "dataset": cfg["dataset"], "model": cfg["model"],
            "method": method, "la": la, "seed": int(cfg["seed"]), "stage": stage,
            "config_hash": metrics["config_hash"], "parent_hash": cfg.get("parent_hash"),
            "acc_many": r["many"], "acc_medium": r["medium"], "acc_few": r["few"], "acc_avg": r["avg"],
            "val_acc": r["val_acc"], "objective": best, "acc_per_class": r["acc_per_class"],
            "fdr_train": metrics["fdr_train"], "fdr_test": metrics["fdr_test"],
            "tau": r["param"] if la == "add" else None, "gamma": r["param"] if la == "mult" else None,
            "wd": cfg["wd"], "fr": cfg["fr"], "stage2_wd": cfg["stage2_wd"] if cfg["stage2"] else None,
            "bn_scale": cfg["bn_scale"] if cfg["bn"] == "fixed" else None, "loss": cfg["loss"],
            "classifier": cfg["classifier"], "wd_scope": cfg["wd_scope"], "bn": cfg["bn"],
            "rho": metrics.get("rho", cfg["rho"]), "lr": cfg["lr"], "batch_size": cfg["batch_size"],
            "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"],
            "train_seconds": metrics["train_seconds"], "fused_k": int(metrics.get("fused_k") or 1),
            "node": metrics["node"],
            "ray_node_id": metrics.get("ray_node_id"), "device": metrics["device"],
            "mlflow_run_id": mlflow_run_id, "wbsweep_version": versions["wbsweep"],
            "torch_version": versions["torch"], "ray_version": versions["ray"], "created_at": created_at,
            "config": json.dumps(cfg, sort_keys=True, default=str),
            "data_fingerprint": metrics.get("data_fingerprint"),
            "git_commit": versions.get("git_commit"), "git_dirty": versions.get("git_dirty"),
            "packages": versions.get("packages"), "pruned": False,
            "classes_in_average": metrics.get("classes_in_average"),
        })
    return rows


def write_rows(folder: str | Path, name: str, rows: list[dict[str, Any]], schema: pa.Schema = SCHEMA) -> str:
    """Write ``rows`` as ``folder/name.parquet`` (a local folder or a storage URI, see
    :mod:`trainables.storage`) so that no reader sees a partial file; the file's location."""
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    final = storage.join(folder, f"{name}.parquet")
    storage.write_bytes(final, buf.getvalue().to_pybytes())
    return final


def read_results(folder: str | Path, schema: pa.Schema = SCHEMA) -> pd.DataFrame:
    """Every row of a results folder (``DIR/results`` or ``DIR/trials``; a local folder or a storage
    URI) with every column of ``schema``, whichever version wrote each file: a column a file lacks
    (one added later) reads as nulls. The same as ``pandas.read_parquet(folder, schema=SCHEMA)``,
    which pyarrow reads as one ``pyarrow.dataset`` with that schema; without ``schema=``, pyarrow
    takes the columns of the first file it lists and drops the others from every row."""
    return read_rows(folder, schema)


#: How a torn rows file is written again once moved away: from the model's run folder, not by training.
REWRITES = {"results": "the next `wbsweep run` of its spec writes its rows again from the model's run folder",
            "analyses": "`wbsweep analyze --missing` writes its rows again from the model's analysis.json"}


def read_rows(folder: str | Path, schema: pa.Schema = SCHEMA, kind: str = "results") -> pd.DataFrame:
    """Every row under ``folder`` (a local folder or a storage URI); an empty frame with the
    schema's columns when there are none.

    The files are read as one ``pyarrow.dataset`` with ``schema``: a column a file lacks
    (``ADDED_LATER``) reads as nulls. A file that is not a readable Parquet file of this schema is
    named in a one-line error rather than surfacing as an Arrow traceback."""
    names = storage.list_files(folder, ".parquet")
    if not names:
        return schema.empty_table().to_pandas()
    fs, root = storage.filesystem(folder)
    try:
        dataset = ds.dataset([f"{root}/{name}" for name in names], schema=schema, format="parquet", filesystem=fs)
        for fragment, name in zip(dataset.get_fragments(), names, strict=True):
            missing = set(schema.names) - set(fragment.physical_schema.names) - ADDED_LATER
            if missing:
                raise WbsweepError(f"{storage.join(folder, name)} is not a wbsweep {kind} file (missing "
                                   f"{', '.join(sorted(missing))}); move it out of {folder}.")
        return dataset.to_table().to_pandas()
    except (pa.ArrowException, OSError):
        pass  # a file that does not read or whose columns do not convert: read one by one to name it
    tables = []
    for name in names:
        f = storage.join(folder, name)
        try:
            t = pq.read_table(pa.BufferReader(storage.read_bytes(f) or b""))
        except (pa.ArrowInvalid, OSError) as exc:
            raise WbsweepError(f"{f} is torn or not a Parquet file ({' '.join(str(exc).split())}); move it out of "
                               f"{folder}: {REWRITES.get(kind, 'then run the command again')}.") from None
        missing = set(schema.names) - set(t.column_names) - ADDED_LATER
        if missing:
            raise WbsweepError(f"{f} is not a wbsweep {kind} file (missing {', '.join(sorted(missing))}); "
                               f"move it out of {folder}.")
        tables.append(_cast(t, schema, f, folder, kind))
    return pa.concat_tables(tables).to_pandas()


def upgrade_files(folder: str | Path, schema: pa.Schema = SCHEMA) -> int:
    """Rewrite the files under ``folder`` that lack a column added later (ADDED_LATER), with that
    column as nulls, each atomically under its own name; the number rewritten.

    Why: ``pandas.read_parquet(folder)`` (pyarrow's dataset discovery) takes the schema of the first
    file it lists, so one file from an earlier version silently drops the newer columns of every
    row. :func:`read_rows` reads mixed folders either way; this keeps the README's pandas one-liner
    true. Unreadable files are left alone (``read_rows`` names them)."""
    added = [name for name in schema.names if name in ADDED_LATER]
    upgraded = 0
    for name in storage.list_files(folder, ".parquet"):
        f = storage.join(folder, name)
        try:
            t = pq.read_table(pa.BufferReader(storage.read_bytes(f) or b""))
        except (pa.ArrowInvalid, OSError):
            continue
        if all(c in t.column_names for c in added) or set(schema.names) - set(t.column_names) - ADDED_LATER:
            continue
        try:
            table = _cast(t, schema, f, folder, "results")
        except WbsweepError:
            continue
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        storage.write_bytes(f, buf.getvalue().to_pybytes())
        upgraded += 1
    return upgraded


def _cast(t: pa.Table, schema: pa.Schema, f: str, folder: str | Path, kind: str) -> pa.Table:
    """``t``'s columns of ``schema`` as its types; a column that does not convert (``seed`` holding
    text, ``acc_per_class`` a number instead of a list) names the file and the column."""
    columns = []
    for field in schema:
        if field.name not in t.column_names:  # a column added later (ADDED_LATER): nulls
            columns.append(pa.nulls(len(t), field.type))
            continue
        col = t.column(field.name)
        try:
            columns.append(col.cast(field.type))
        except (pa.ArrowException, TypeError, ValueError):
            raise WbsweepError(f"{f} is not a wbsweep {kind} file (column {field.name} holds {col.type}, "
                               f"not {field.type}); move it out of {folder}.") from None
    return pa.Table.from_arrays(columns, schema=schema)


def mixed_data(rows: pd.DataFrame) -> list[str]:
    """One line per dataset name whose rows were trained on more than one data fingerprint (a fake
    CIFAR and the real one, two --data-root folders): such rows must not be averaged together."""
    lines = []
    known = rows[rows["data_fingerprint"].notna()]
    for dataset, prints in known.groupby("dataset", sort=False)["data_fingerprint"]:
        if prints.nunique() > 1:
            lines.append(f"{dataset}: rows from {prints.nunique()} different data ({', '.join(sorted(set(prints)))}); "
                         "the data_fingerprint column tells them apart.")
    return lines


def fewer_classes(rows: pd.DataFrame) -> list[str]:
    """One line per method (dataset, model) whose test accuracies are averaged over fewer classes
    than its dataset has: a class the test split lacks has no recall and is left out of Many/Medium/
    Few and the average. From ``classes_in_average`` (rows written before it: the classes with a
    recall in ``acc_per_class``)."""
    lines = []
    for (dataset, model, method), g in rows.groupby(["dataset", "model", "method"], sort=False):
        for per_class, used in zip(g["acc_per_class"], g["classes_in_average"], strict=True):
            if per_class is None or len(per_class) == 0:
                continue
            recall = pd.Series(list(per_class), dtype=float)
            n = int(used) if pd.notna(used) else int(recall.notna().sum())
            if n < len(recall):
                absent = ", ".join(str(k) for k in recall.index[recall.isna()]) or "?"
                lines.append(f"{method} ({dataset}, {model}): the test accuracies are averaged over {n} of "
                             f"{len(recall)} classes; the test split has no image of class {absent}.")
                break
    return lines
