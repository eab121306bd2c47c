"""Which well-known dataset a folder's files hold, by their content, not their names.

MNIST and Fashion-MNIST ship four files of the very same names and format; CIFAR-10 and CIFAR-100
are pickles of one format. A reader (trainables/readers.py) hands :func:`check_identity` a
SHA-256 per file it read, of what it decoded:

* IDX files (MNIST, Fashion-MNIST): the uncompressed file, header included, so
  ``gunzip -c train-images-idx3-ubyte.gz | sha256sum`` gives the same sum;
* CIFAR pickles: the ``data`` array (N x 3072 uint8, C order), because rebuilt pickles of the
  same images have other file bytes (../shared/data/get_cifar10.py records the same sums).

The decision, per file:

* its sum is one of ANOTHER known dataset's: refused in one line naming what the files are
  ("the files in X are Fashion-MNIST's, not MNIST's"), because training them would report one
  dataset's numbers under the other's name;
* its sum is the expected dataset's: verified;
* any other content (a re-release, a subset, files a test writes with random pixels): accepted as
  it is. It is not a known dataset's, so it cannot be mistaken for one; the split's
  ``data_fingerprint`` (in every results row and in the config hash) records which content it was.

The sums are of the original releases (MNIST and Fashion-MNIST: computed from the original IDX
files; CIFAR-10: the data arrays of the original batches). CIFAR-100 has none recorded: no copy
could be checked offline, and its file names (``train``, ``test``) cannot be taken for CIFAR-10's.

Hashing costs a pass over bytes already in memory (SHA-256: 0.11 s for MNIST's four files, 0.27 s for
CIFAR-10, about 12 % of reading them: docs/data.md); it is done when the files are decoded,
which the node's data cache (trainables/datacache.py, keyed by every file's path, size and mtime)
does once per data version, and within a process a file's sum is kept by path, size and mtime.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from trainables.errors import WbsweepError

#: dataset key -> (title, {file name: SHA-256 of its content as described above})
KNOWN: dict[str, tuple[str, dict[str, str]]] = {
    "mnist": ("MNIST", {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }),
    "fashion-mnist": ("Fashion-MNIST", {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }),
    "cifar10": ("CIFAR-10", {
        "data_batch_1": "a50e8b48728e1667d682a807155c375279d5ae321fb12242c02e3104a6bc8b21",
        "data_batch_2": "0b825e5592c3b72ea18d6ec2ff5f5b19d33e41a75f5039054a9bb87be3cf69a0",
        "data_batch_3": "c6ee1dd4601a69ec085d8ebf53ee6441775491a6839a0a9ae8fa198e88a3a429",
        "data_batch_4": "1f6b6c799cff375a9f8fae2fac909d51ee09f38a6a60eebb9e8fec6f47ddc48f",
        "data_batch_5": "58e3bbf713e28357476a351d3a05d056372f94c681d04ca9d62a076fdf2a643b",
        "test_batch": "177777c33ba79825320efa646ad04a94bdc3c80e4ebe3bd21724f8cdfd4b9d56",
    }),
    "cifar100": ("CIFAR-100", {}),
}

_memo: dict[tuple[str, int, int], str] = {}


def _stamp(path: Path) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return str(Path(path).absolute()), st.st_size, st.st_mtime_ns


def content_digest(path: Path, content: bytes | np.ndarray) -> str:
    """SHA-256 of ``content`` (what was decoded from ``path``), computed once per path, size and
    mtime in this process."""
    stamp = _stamp(path)
    if stamp is not None and stamp in _memo:
        return _memo[stamp]
    data = memoryview(np.ascontiguousarray(content)).cast("B") if isinstance(content, np.ndarray) else content
    digest = hashlib.sha256(data).hexdigest()
    if stamp is not None:
        _memo[stamp] = digest
    return digest


def check_identity(key: str, files: dict[Path, str], hint: str) -> str:
    """Refuse files whose content is another known dataset's (one WbsweepError line naming what they
    are); return "verified" where every file is ``key``'s own release, else "unknown" (accepted)."""
    title, own = KNOWN.get(key, (key, {}))
    for other, (other_title, sums) in KNOWN.items():
        if other == key:
            continue
        theirs = {path for path, digest in files.items() if digest in sums.values()}
        if not theirs:
            continue
        folder = next(iter(files)).parent
        what = f"the files in {folder} are" if len(theirs) == len(files) else \
            f"{', '.join(sorted(p.name for p in theirs))} in {folder} {'is' if len(theirs) == 1 else 'are'}"
        raise WbsweepError(
            f"{key}: {what} {other_title}'s, not {title}'s (by their SHA-256 sums); put {title}'s files there "
            f"({hint}), or use these as {other_title} (datasets {other}, {other}-lt)"
        )
    return "verified" if own and all(own.get(_stem(p)) == d for p, d in files.items()) else "unknown"


def _stem(path: Path) -> str:
    return path.name[:-3] if path.name.endswith(".gz") else path.name
