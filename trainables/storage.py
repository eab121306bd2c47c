"""Where a sweep's shared files live: a folder (local or a shared filesystem) or an object store.

A *location* is a string: a local path (``/shared/sweep``) or a URI that pyarrow understands
(``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``; an S3 URI may carry pyarrow's query
options such as ``?endpoint_override=host:9000&scheme=http``, and the usual ``AWS_*`` variables
apply). Under it: ``results/``, ``trials/`` and ``analyses/`` (Parquet), ``runs/<hash>/seed<k>/``
(each trained model's folder) and ``ray/`` (Ray Tune's experiment state).

Trainers work in a local folder. For a local location that folder *is* the run folder, so nothing
is copied. For an object store the trainer works in a node-local scratch folder and copies files
up: its checkpoint each time it saves one (so a retry on another node resumes from it) and the
whole folder when the model is finished; a retry, a second-stage model (WB) and the driver copy
down what they need. Objects are written whole (one PUT), so a reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainables.errors import WbsweepError

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def _pafs():
    """``pyarrow.fs``, imported on first use: a trainer whose runs live in a local folder never needs
    it, so ``trainables.train`` runs where pyarrow is not installed (bench/gpu_paper_rows.py)."""
    import pyarrow.fs

    return pyarrow.fs


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is an object-store (or other non-local) URI rather than a local path."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...``, keeping a URI's query string (its options) at the end."""
    s = str(location)
    if not is_remote(s):
        return str(Path(s.removeprefix("file://"), *parts))
    base, sep, query = s.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


@functools.lru_cache(maxsize=32)
def _filesystem(base: str) -> tuple[pafs.FileSystem, str]:
    try:
        return _pafs().FileSystem.from_uri(base)
    except (ValueError, OSError, NotImplementedError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise WbsweepError(f"cannot open storage {base}: {str(exc).splitlines()[0]}") from None


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path inside it (cached per process, so a
    trial does not reconnect for every file)."""
    s = str(location)
    if not is_remote(s):
        return _pafs().LocalFileSystem(), str(Path(s.removeprefix("file://")).expanduser().resolve())
    base, _, query = s.partition("?")
    # The filesystem is made from bucket + query (its options); the rest of the path is ours.
    scheme, _, rest = base.partition("://")
    bucket, _, key = rest.partition("/")
    fs, root = _filesystem(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))
    return fs, "/".join(p for p in (root.rstrip("/"), key.strip("/")) if p)


@contextlib.contextmanager
def _one_line(location: str | Path) -> Iterator[None]:
    """An object store that cannot be reached (endpoint, credentials, permissions) fails with one
    line naming the location instead of pyarrow's traceback."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        if not is_remote(location):
            raise
        raise WbsweepError(f"storage {location}: {str(exc).splitlines()[0]}; check the bucket, its credentials "
                           "(AWS_* variables or the instance profile) and AWS_ENDPOINT_URL.") from None


def exists(location: str | Path) -> bool:
    fs, path = filesystem(location)
    with _one_line(location):
        return fs.get_file_info(path).type != _pafs().FileType.NotFound


def list_files(location: str | Path, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly under ``location`` ending in ``suffix``, sorted."""
    fs, path = filesystem(location)
    with _one_line(location):
        infos = fs.get_file_info(_pafs().FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(Path(i.path).name for i in infos if i.type == _pafs().FileType.File and i.path.endswith(suffix))


def read_bytes(location: str | Path) -> bytes | None:
    """The file's content, or None when it does not exist."""
    fs, path = filesystem(location)
    try:
        with _one_line(location), fs.open_input_stream(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def read_json_object(location: str | Path) -> dict[str, Any] | None:
    """The JSON object in a file, or None when there is none: the file is missing, or torn (a power
    cut between write and rename can leave it empty) or not an object, which callers treat alike."""
    data = read_bytes(location)
    try:
        doc = None if data is None else json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file so that no reader sees part of it: temporary name + rename on a local
    filesystem, a single PUT on an object store."""
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, _pafs().LocalFileSystem):
        Path(parent).mkdir(parents=True, exist_ok=True)
        # a name of this writer's own: two processes writing one file never share a temporary
        tmp = Path(parent) / f".{Path(path).name}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            tmp.write_bytes(data)
        except OSError:  # a full disk: no torn temporary left behind (the file itself is untouched)
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        return
    with _one_line(location):
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as fh:
            fh.write(data)


def delete(location: str | Path) -> None:
    """Delete one file if it exists."""
    fs, path = filesystem(location)
    with _one_line(location), contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def check_writable(location: str | Path) -> None:
    """Fail early, with one line, when ``location`` cannot be written (wrong bucket, credentials)."""
    probe = join(location, ".wbsweep-write-check")
    try:
        write_bytes(probe, b"ok")
        delete(probe)
    except WbsweepError:
        raise
    except Exception as exc:
        raise WbsweepError(f"cannot write to storage {location}: {str(exc).splitlines()[0]}; "
                           "check the path or bucket and its credentials.") from None


# --- run folders ------------------------------------------------------------------------------


def scratch_root() -> Path:
    """Node-local folder where trainers keep the run folders of an object-store sweep while they
    work on them (``WBSWEEP_SCRATCH``, else the system's temporary folder)."""
    return Path(os.environ.get("WBSWEEP_SCRATCH") or Path(tempfile.gettempdir()) / "wbsweep-scratch")


def run_location(runs: str | Path, hash_: str, seed: int) -> str:
    return join(runs, hash_, f"seed{seed}")


def run_dir(runs: str | Path, hash_: str, seed: int) -> Path:
    """The local folder a trainer works in: the run folder itself for a local ``runs``, a
    scratch folder (one per storage location, run and seed) for an object store."""
    if not is_remote(runs):
        return Path(str(runs).removeprefix("file://"), hash_, f"seed{seed}")
    key = hashlib.sha1(str(runs).encode()).hexdigest()[:10]
    return scratch_root() / key / hash_ / f"seed{seed}"


def download(location: str | Path, local: Path, names: list[str] | None = None) -> list[str]:
    """Copy the files of the remote folder ``location`` (only ``names`` when given) into ``local``;
    the names copied. Nothing to do for a local location."""
    if not is_remote(location):
        return []
    local.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names if names is not None else list_files(location):
        data = read_bytes(join(location, name))
        if data is None:
            continue
        tmp = local / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, local / name)
        copied.append(name)
    return copied


def upload(local: Path, location: str | Path, names: list[str] | None = None) -> list[str]:
    """Copy the files of ``local`` (only ``names`` when given; temporary files never) to the remote
    folder ``location``; metrics.json last, because its presence marks a run as finished."""
    if not is_remote(location):
        return []
    files = [p.name for p in local.iterdir() if p.is_file() and not p.name.endswith(".tmp")] if names is None else names
    files = sorted((f for f in files if (local / f).is_file()), key=lambda f: (f == "metrics.json", f))
    for name in files:
        write_bytes(join(location, name), (local / name).read_bytes())
    return files


@contextlib.contextmanager
def local_copy(runs: str | Path, hash_: str, seed: int) -> Iterator[Path]:
    """A finished model's folder on this machine: the run folder itself for a local ``runs``, a
    temporary copy downloaded from the object store otherwise (gone after the ``with``)."""
    if not is_remote(runs):
        yield run_dir(runs, hash_, seed)
        return
    with tempfile.TemporaryDirectory(prefix="wbsweep-run-") as tmp:
        download(run_location(runs, hash_, seed), Path(tmp))
        yield Path(tmp)


def finish_upload(local: Path, location: str | Path) -> None:
    """Copy a finished run folder to the object store and drop what only a retry needed: the
    checkpoint there, and the scratch folder here. Nothing to do for a local location."""
    if not is_remote(location):
        return
    upload(local, location)
    delete(join(location, "checkpoint.pt"))
    shutil.rmtree(local, ignore_errors=True)
    with contextlib.suppress(OSError):
        local.parent.rmdir()  # the config's folder, once its last seed is done here
