"""Datasets prepared once per node, not once per trial.

Reading a dataset means decoding its files (CIFAR's pickles, gzip IDX files, mini-ImageNet's
arrays) and cutting the long-tailed split: about a second for CIFAR, much more for
mini-ImageNet-LT, and the same work in every trial. :func:`cached_dataset` does it once per node
and keeps the prepared splits as ``.npy`` files in a node-local folder
(``$WBSWEEP_DATA_CACHE``, else ``<scratch>/data``; ``WBSWEEP_DATA_CACHE=off`` turns it off).
Later trials on that node map them (copy-on-write), so the processes share one copy in the page
cache; within one process (Ray reuses trial actors) the dataset is kept in memory as well.

An entry is keyed by the dataset, its options and the size and modification time of every file
of the data root that the dataset could read, so replacing the files makes a new entry. An entry
is written to a temporary folder and renamed, so a crash leaves none half-written; an unreadable
entry is read from the source again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from trainables.data import LTDataset, check_dataset, data_fingerprint, load_dataset
from trainables.dataset_registry import _spec
from trainables.readers import resolve_root

CACHE_ENV = "WBSWEEP_DATA_CACHE"
FORMAT = 3  # bump when the split, the stored layout or the checks on reading change (2: the split option,
#             the fingerprint; 3: the files checked by content, trainables/identity.py)
TENSORS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
_in_process: dict[str, LTDataset] = {}


def cache_root() -> Path | None:
    """The node-local cache folder, or None when caching is turned off."""
    from trainables.storage import scratch_root

    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0", "no", "false"):
        return None
    return Path(value).expanduser() if value else scratch_root() / "data"


def _fingerprint(root: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of the files up to two folders below ``root``: where every reader looks."""
    found = []
    for depth in ("*", "*/*", "*/*/*"):
        for p in root.glob(depth):
            try:
                st = p.stat()
            except OSError:
                continue
            if p.is_file():
                found.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return sorted(found)


def cache_key(name: str, data_root: str | Path | None, rho: float | None, val_per_class: int,
              split: str = "file") -> str:
    src = _spec(name).source
    root = resolve_root(data_root) if src.needs_files else None
    doc = {"format": FORMAT, "name": name, "rho": rho, "val": int(val_per_class), "split": split,
           "root": str(root) if root else None, "files": _fingerprint(root) if root and root.is_dir() else []}
    return f"{name}-{hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]}"


def _write(entry: Path, data: LTDataset) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for t in TENSORS:
            np.save(tmp / f"{t}.npy", getattr(data, t).numpy())
        for split, idx in data.indices.items():
            np.save(tmp / f"index_{split}.npy", np.asarray(idx))
        meta = {"name": data.name, "num_classes": data.num_classes, "class_counts": list(data.class_counts),
                "mean": list(data.mean), "std": list(data.std), "augment": data.augment,
                "many_threshold": data.many_threshold, "few_threshold": data.few_threshold,
                "indices": sorted(data.indices), "fingerprint": data_fingerprint(data)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, entry)  # another process may have won the race: then its entry stays
    except OSError:
        pass  # a full or read-only disk: the trial still has its data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(entry: Path) -> LTDataset | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        arrays = {t: torch.from_numpy(np.load(entry / f"{t}.npy", mmap_mode="c")) for t in TENSORS}
        indices = {s: np.load(entry / f"index_{s}.npy") for s in meta.pop("indices")}
    except (OSError, ValueError, KeyError):
        return None
    return LTDataset(**arrays, **{**meta, "mean": tuple(meta["mean"]), "std": tuple(meta["std"])},
                     indices=indices)


def cached_dataset(name: str, data_root: str | Path | None = None, rho: float | None = None,
                   val_per_class: int = 20, split: str = "file", download: bool = True) -> LTDataset:
    """:func:`trainables.data.load_dataset`, prepared once per node (see the module docstring).
    ``download`` false: missing files are a one-line WbsweepError, not fetched."""
    root = cache_root()
    if root is None:
        return load_dataset(name, data_root, rho, val_per_class=val_per_class, split=split, download=download)
    key = cache_key(name, data_root, rho, val_per_class, split)
    if key in _in_process:
        return _in_process[key]
    entry = root / key
    data = _read(entry) if entry.is_dir() else None
    if data is None:
        data = load_dataset(name, data_root, rho, val_per_class=val_per_class, split=split, download=download)
        shutil.rmtree(entry, ignore_errors=True)  # an unreadable entry
        _write(entry, data)
    _in_process[key] = data
    return data


def dataset_fingerprint(name: str, data_root: str | Path | None = None, rho: float | None = None,
                        val_per_class: int = 20, split: str = "file", download: bool = True) -> str:
    """The split's :func:`trainables.data.data_fingerprint`, with every check of loading it (a
    missing or corrupt file is a one-line WbsweepError). The driver calls this before a sweep: the
    dataset is then prepared in this node's cache, where its trials find it (a local cluster), and
    the fingerprint is kept in the entry, so it is computed once per node and data version.
    ``download`` false (the report, ``--plan``): files that are not here are not fetched."""
    quick = check_dataset(name, data_root, rho, val_per_class, split) if _spec(name).source.split_rule == "lists" \
        else None
    return quick or data_fingerprint(cached_dataset(name, data_root, rho, val_per_class, split, download))
