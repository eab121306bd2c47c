"""The standard on-disk formats a dataset is read from: CIFAR's python pickles, the IDX files of
MNIST and Fashion-MNIST, scikit-learn's bundled digits; where the data root is and how missing
files are downloaded (through torchvision, where the network allows).

Why this module reads files itself: the project must run from the CIFAR python pickles and the
MNIST IDX files whatever their provenance (rebuilt or re-saved CIFAR pickles have other MD5s, which
torchvision's ``CIFAR10`` class refuses), and every structural fault (a truncated download, a foreign
file under a dataset's name) must become one line naming the file. Each reader returns a
:class:`Raw`: the original images and labels in file order, before :mod:`trainables.data` cuts the
split. Tests write small files in exactly these formats.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import pickle
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainables.errors import WbsweepError
from trainables.identity import check_identity, content_digest

#: Environment variable that overrides the default data root (handy on clusters with shared storage).
DATA_ROOT_ENV = "WBSWEEP_DATA_ROOT"

# --------------------------------------------------------------------------------------------------
# Raw sources: what a reader hands to the splitter
# --------------------------------------------------------------------------------------------------


@dataclass
class Raw:
    """The original data before the LT split; the pool is what the train/val split is cut from."""

    x_pool: np.ndarray  # uint8 (N, C, H, W), file order
    y_pool: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    pool_index: np.ndarray  # position of each pool image in its source (identity for file datasets)
    test_index: np.ndarray


# --------------------------------------------------------------------------------------------------
# Data root and downloads
# --------------------------------------------------------------------------------------------------


def default_data_root() -> Path:
    """``$WBSWEEP_DATA_ROOT`` if set, else ``~/.cache/wbsweep/data`` (a per-user cache, no sudo needed)."""
    env = os.environ.get(DATA_ROOT_ENV, "").strip()
    # absolute: a trial runs in its own working folder, where a relative path would mean another place
    return Path(env).expanduser().absolute() if env else Path("~/.cache/wbsweep/data").expanduser()


def resolve_root(data_root: str | Path | None) -> Path:
    root = default_data_root() if data_root is None else Path(data_root).expanduser()
    if root.exists() and not root.is_dir():
        raise WbsweepError(
            f"data root {root} is a file, not a folder; pass --data-root (or {DATA_ROOT_ENV}) "
            "pointing at the folder that holds the datasets"
        )
    return root


def _one_line(exc: BaseException) -> str:
    """Exception text squeezed onto one line, because error messages must be a single line."""
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _download_lock(root: Path) -> Iterator[None]:
    """Serialise downloads into one root: parallel Ray trials on a fresh node would otherwise all
    download and extract the same archive over each other."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking, downloads may race
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".wbsweep-download.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_archive(url: str, root: Path, md5: str) -> None:
    """Fetch and unpack an archive into ``root`` (torchvision's helper checks the MD5)."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(url, str(root), md5=md5)


def _download_file(url: str, folder: Path, filename: str, md5: str) -> None:
    """Fetch one file unchanged into ``folder`` (the IDX .gz files are read compressed)."""
    from torchvision.datasets.utils import download_url

    download_url(url, str(folder), filename=filename, md5=md5)


# --------------------------------------------------------------------------------------------------
# CIFAR python pickles
# --------------------------------------------------------------------------------------------------

# Globals a CIFAR pickle may reference: numpy's array reconstruction, by either module name (numpy
# 1.x writes numpy.core, 2.x numpy._core), protocol 5's buffer-based one (_frombuffer), and the
# latin-1 codec protocol 0-2 pickles use for bytes. Anything else is refused, because unpickling a
# downloaded file must not be able to run arbitrary code.
_PICKLE_GLOBALS = {
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
_NUMPY_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"  # the installed numpy's spelling


class _UnsupportedPickle(pickle.UnpicklingError):
    """A well-formed pickle that asks for something this reader does not allow."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise _UnsupportedPickle(f"it references {module}.{name}")
        for prefix in ("numpy._core", "numpy.core"):  # a file written by the other numpy major version
            if module.startswith(prefix + "."):
                module = _NUMPY_CORE + module[len(prefix):]
        return super().find_class(module, name)


def _get(entry: dict, key: str) -> Any:
    """Look a key up as bytes (original Python 2 files loaded with encoding="bytes") or as str."""
    if key.encode() in entry:
        return entry[key.encode()]
    return entry.get(key)


def _read_cifar_file(
    path: Path, label_key: str, num_classes: int, hint: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """One CIFAR pickle -> (uint8 (n, 3, 32, 32), int64 (n,), the SHA-256 of its data array), with every
    structural check that turns a truncated or foreign file into a one-line message naming it."""
    bad = f"delete it and {hint}"
    try:
        with open(path, "rb") as fh:
            entry = _CifarUnpickler(fh, encoding="bytes").load()
    except OSError as exc:
        raise WbsweepError(f"cannot read CIFAR file {path} ({_one_line(exc)}); {bad}") from exc
    except _UnsupportedPickle as exc:  # valid, perhaps: never call it corrupt
        raise WbsweepError(
            f"CIFAR file {path} is an unsupported variant of the format ({exc}; only dicts of numpy arrays, "
            "lists and strings are read, for safety); re-save it as a dict of numpy arrays with pickle, or "
            f"{hint}"
        ) from exc
    except Exception as exc:  # truncated or garbled pickles raise many different types
        raise WbsweepError(
            f"CIFAR file {path} is corrupt or truncated ({_one_line(exc)}); {bad}"
        ) from exc
    data = _get(entry, "data") if isinstance(entry, dict) else None
    labels = _get(entry, label_key) if isinstance(entry, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise WbsweepError(f"CIFAR file {path} lacks the 'data' or '{label_key}' entry; {bad}")
    labels = np.asarray(labels)
    shape_ok = data.ndim == 2 and data.shape[1] == 3 * 32 * 32 and labels.shape == (len(data),)
    if data.dtype != np.uint8 or not shape_ok:
        raise WbsweepError(
            f"CIFAR file {path} has data {data.dtype}{list(data.shape)} and {labels.size} labels, expected "
            f"uint8 [n, 3072] and n labels; {bad}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise WbsweepError(f"CIFAR file {path} has labels outside 0..{num_classes - 1}; {bad}")
    # Rows are the R, G and B planes of a 32x32 image, row-major: exactly (3, 32, 32) in C order.
    return data.reshape(len(data), 3, 32, 32), labels.astype(np.int64), content_digest(path, data)


def read_cifar(
    root: Path,
    download: bool,
    *,
    key: str,
    folder: str,
    train_files: tuple[str, ...],
    test_files: tuple[str, ...],
    label_key: str,
    num_classes: int,
    url: str,
    md5: str,
) -> Raw:
    """Read CIFAR-10/100 from ``root/<folder>``, downloading the official archive if allowed."""
    base = root / folder
    wanted = train_files + test_files
    missing = [name for name in wanted if not (base / name).is_file()]
    how = (
        f"download {url} (md5 {md5}) and extract it into {root}, or pass --data-root (or {DATA_ROOT_ENV}) "
        f"pointing at the folder that contains {folder}/"
    )
    if missing and download:
        try:
            with _download_lock(root):
                if any(not (base / name).is_file() for name in wanted):
                    _download_archive(url, root, md5)
        except Exception as exc:  # offline, HTTP errors, MD5 mismatch, bad archive...
            raise WbsweepError(
                f"{key}: expected {', '.join(wanted)} in {base}, and downloading them failed "
                f"({_one_line(exc)}); {how}"
            ) from exc
        missing = [name for name in wanted if not (base / name).is_file()]
    if missing:
        raise WbsweepError(
            f"{key}: missing {', '.join(missing)} in {base} (expected {', '.join(wanted)}); {how}"
        )
    hint = f"download {url} again"
    read = {base / name: _read_cifar_file(base / name, label_key, num_classes, hint) for name in wanted}
    check_identity(key, {path: sha for path, (_, _, sha) in read.items()}, how)
    train = [read[base / name] for name in train_files]
    test = [read[base / name] for name in test_files]
    x_pool = np.concatenate([x for x, _, _ in train])
    y_pool = np.concatenate([y for _, y, _ in train])
    x_test = np.concatenate([x for x, _, _ in test])
    y_test = np.concatenate([y for _, y, _ in test])
    return Raw(x_pool, y_pool, x_test, y_test, np.arange(len(y_pool)), np.arange(len(y_test)))


# --------------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or not) into a native-endian numpy array.

    Format: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then one
    big-endian uint32 per dimension, then the data in C order. Every deviation (bad gzip, wrong
    magic, fewer or more data bytes than the header promises) is a WbsweepError naming the file,
    so a truncated download is reported as such instead of as a reshape error deep in training.
    """
    return _decode_idx(Path(path), digest=False)[0]


def _decode_idx(path: Path, digest: bool) -> tuple[np.ndarray, str | None]:
    """:func:`read_idx`, and the SHA-256 of the uncompressed file where ``digest`` (trainables/identity.py)."""
    redo = "delete it and download it again"
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic; the official files are .gz, torchvision also unpacks them
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise WbsweepError(f"cannot read IDX file {path} ({_one_line(exc)}); {redo}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise WbsweepError(f"{path} is not an IDX file (magic {raw[:4].hex() or 'missing'}); {redo}")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise WbsweepError(f"IDX file {path} is truncated inside its header; {redo}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise WbsweepError(
            f"IDX file {path} has {len(raw) - header} data bytes but its header {list(dims)} needs "
            f"{expected} (truncated or corrupt); {redo}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    sha = content_digest(path, raw) if digest else None
    return array.astype(dtype.newbyteorder("="), copy=True), sha  # writable, native byte order


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _find_idx(root: Path, dirs: tuple[str, ...]) -> list[Path] | None:
    """The four files from the first candidate folder that has all of them (plain or .gz)."""
    for sub in dirs:
        folder = root / sub if sub else root
        found = []
        for stem in _IDX_FILES:
            # Plain first: torchvision leaves both and the unpacked file reads faster.
            hit = next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    return None


def _read_idx_images(path: Path, labels: bool) -> tuple[np.ndarray, str]:
    array, sha = _decode_idx(path, digest=True)
    want = 1 if labels else 3
    if array.ndim != want or array.dtype != np.uint8:
        raise WbsweepError(
            f"IDX file {path} holds {array.dtype}{list(array.shape)}, expected uint8 with {want} "
            "dimension(s); check that the right file has this name"
        )
    return array, sha


def read_mnist_like(
    root: Path,
    download: bool,
    *,
    key: str,
    dirs: tuple[str, ...],
    download_dir: str,
    mirrors: tuple[str, ...],
    md5s: tuple[str, ...],
    num_classes: int,
    extra_hint: str = "",
) -> Raw:
    """Read an MNIST-format dataset from the first of ``root/<dir>`` that has all four files."""
    files = _find_idx(root, dirs)
    places = ", ".join(str(root / d) if d else str(root) for d in dirs)
    names = ", ".join(stem + ".gz" for stem in _IDX_FILES)
    how = (
        f"download them from {mirrors[0]} into {root / download_dir}{extra_hint}, or pass --data-root "
        f"(or {DATA_ROOT_ENV}) pointing at a folder that has them"
    )
    failure = ""
    if files is None and download:
        target = root / download_dir
        errors = []
        try:
            with _download_lock(root):
                for stem, md5 in zip(_IDX_FILES, md5s, strict=True):
                    if (target / (stem + ".gz")).is_file():
                        continue
                    for mirror in mirrors:  # torchvision's mirror list: the first may be down
                        try:
                            _download_file(mirror + stem + ".gz", target, stem + ".gz", md5)
                            break
                        except Exception as exc:  # offline, HTTP errors, MD5 mismatch
                            errors.append(f"{mirror}{stem}.gz: {_one_line(exc)}")
                    else:
                        break  # no mirror has this file: the others will not help, fail fast
        except OSError as exc:  # the data root itself is not writable
            errors.append(f"{root}: {_one_line(exc)}")
        files = _find_idx(root, dirs)
        if errors:
            failure = f", and downloading them failed ({errors[0]})"
    if files is None:
        raise WbsweepError(f"{key}: the IDX files {names} were not found in any of {places}{failure}; {how}")
    read = [_read_idx_images(p, labels=i % 2 == 1) for i, p in enumerate(files)]
    # Another known dataset's files under this one's names (Fashion-MNIST's in MNIST's folder) are refused
    check_identity(key, {p: sha for p, (_, sha) in zip(files, read, strict=True)}, how)
    x_train, y_train, x_test, y_test = (array for array, _ in read)
    for x, y in ((x_train, y_train), (x_test, y_test)):
        if len(x) != len(y):
            raise WbsweepError(f"{key}: {files[0].parent} has {len(x)} images but {len(y)} labels; {how}")
        if y.size and y.max() >= num_classes:
            raise WbsweepError(f"{key}: labels in {files[0].parent} exceed {num_classes - 1}; {how}")
    x_train, x_test = x_train[:, None], x_test[:, None]  # (N, 1, H, W)
    return Raw(
        x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64),
        np.arange(len(y_train)), np.arange(len(y_test)),
    )


# --------------------------------------------------------------------------------------------------
# scikit-learn digits (the embedded default: no files, no network)
# --------------------------------------------------------------------------------------------------

_DIGITS_TEST_PER_CLASS = 50

# Computed once from the uint8 images this module makes (round(v * 255 / 16)), over all 1,797
# images and all 64 pixels, divided by 255; population std (ddof 0), like the CIFAR constants:
#   x = np.round(load_digits().images * 255 / 16).astype(np.uint8) / 255; x.mean(), x.std()
#   -> 0.305309, 0.375886   (tests/test_data.py recomputes them)
DIGITS_MEAN = (0.30531,)
DIGITS_STD = (0.37589,)


def read_digits(root: Path, download: bool) -> Raw:
    """load_digits as uint8 8x8 images; the last 50 images of each class (file order) are the
    balanced test set, because the data has no official one. ``root``/``download`` are unused."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(np.asarray(bunch.images, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8)[:, None]
    y = np.asarray(bunch.target, dtype=np.int64)
    test_mask = np.zeros(len(y), dtype=bool)
    for k in range(10):
        test_mask[np.flatnonzero(y == k)[-_DIGITS_TEST_PER_CLASS:]] = True
    pool_index, test_index = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    return Raw(x[pool_index], y[pool_index], x[test_index], y[test_index], pool_index, test_index)
