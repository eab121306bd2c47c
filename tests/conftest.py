"""The fixtures of the test session: small datasets written in the exact on-disk formats, the real
data sources, one Ray cluster for the sweeps that do not test Ray's own start, and the reference smoke
sweep. What is shared but no fixture (running the command line, reading a results folder) is in
tests/helpers.py.

The fakes are written byte-for-byte the way the original releases are laid out (Python 2
protocol-2 CIFAR pickles, big-endian gzip IDX files), so that the readers are tested against the
real formats rather than against whatever this repository's own writer happens to produce.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import RayCluster, kill_tree, sorted_rows, wbsweep

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------------------------------
# CIFAR pickles as the original release wrote them (Python 2, cPickle protocol 2, numpy 1.x)
# --------------------------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR dicts.

    Differences from a Python 3 pickle that matter to readers: every byte string (dict keys,
    batch_label, filenames and the array's raw buffer) is a Python 2 ``str`` (SHORT_BINSTRING /
    BINSTRING opcodes, which ``encoding="bytes"`` turns into bytes), and arrays are rebuilt through
    ``numpy.core.multiarray._reconstruct`` (the pre-numpy-2 module name) with the buffer inline.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)

    def save_ndarray(self, arr: np.ndarray) -> None:
        assert arr.dtype == np.uint8, "the CIFAR files only hold uint8 arrays"
        arr = np.ascontiguousarray(arr)
        # _reconstruct(ndarray, (0,), 'b')
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
        self.write(pickle.GLOBAL + b"numpy\nndarray\n")
        self.save((0,))
        self.save(b"b")
        self.write(pickle.TUPLE3 + pickle.REDUCE)
        # __setstate__((1, shape, dtype('uint8'), is_fortran=False, raw bytes))
        self.write(pickle.MARK)
        self.save(1)
        self.save(tuple(int(d) for d in arr.shape))
        self.write(pickle.GLOBAL + b"numpy\ndtype\n")
        self.save((b"u1", 0, 1))
        self.write(pickle.REDUCE)
        self.save((3, b"|", None, None, None, -1, -1, 0))
        self.write(pickle.BUILD)
        self.save(False)
        self.save(arr.tobytes())
        self.write(pickle.TUPLE + pickle.BUILD)

    dispatch[bytes] = save_py2_str
    dispatch[np.ndarray] = save_ndarray


def write_py2_pickle(obj: object, path: Path) -> None:
    with open(path, "wb") as fh:
        Py2Pickler(fh, protocol=2).dump(obj)


def _labels_in_file_order(counts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int64)


def _per_class(value: int | Sequence[int], num_classes: int) -> list[int]:
    return [int(value)] * num_classes if isinstance(value, int) else [int(v) for v in value]


def make_cifar_files(
    root: Path,
    num_classes: int,
    per_class_train: int | Sequence[int],
    per_class_test: int | Sequence[int],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a fake CIFAR-10 (5 data batches + test_batch) or CIFAR-100 (train + test) under
    ``root`` with random pixels and labels in shuffled file order; return the arrays in file
    order: x_train / x_test as (n, 3072) uint8 rows, y_train / y_test as int64."""
    assert num_classes in (10, 100)
    rng = np.random.default_rng(seed)
    y_train = _labels_in_file_order(_per_class(per_class_train, num_classes), rng)
    y_test = _labels_in_file_order(_per_class(per_class_test, num_classes), rng)
    x_train = rng.integers(0, 256, size=(len(y_train), 3072), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(len(y_test), 3072), dtype=np.uint8)
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, len(y_train), 6).astype(int)
        parts = [(f"data_batch_{i + 1}", slice(bounds[i], bounds[i + 1]), f"training batch {i + 1} of 5")
                 for i in range(5)]
        for name, sl, title in parts:
            _write_cifar10_batch(folder / name, x_train[sl], y_train[sl], title)
        _write_cifar10_batch(folder / "test_batch", x_test, y_test, "testing batch 1 of 1")
        write_py2_pickle({b"num_cases_per_batch": 10000, b"num_vis": 3072,
                          b"label_names": [f"class{k}".encode() for k in range(10)]}, folder / "batches.meta")
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            write_py2_pickle({
                b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(y))],
                b"batch_label": f"{name}ing batch 1 of 1".encode(),
                b"fine_labels": [int(v) for v in y],
                b"coarse_labels": [int(v) // 5 for v in y],
                b"data": x,
            }, folder / name)
        write_py2_pickle({b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                          b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]}, folder / "meta")
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _write_cifar10_batch(path: Path, x: np.ndarray, y: np.ndarray, title: str) -> None:
    write_py2_pickle({
        b"batch_label": title.encode(),
        b"labels": [int(v) for v in y],
        b"data": x,
        b"filenames": [f"{path.name}_{i:05d}.png".encode() for i in range(len(y))],
    }, path)


@pytest.fixture
def make_cifar() -> Callable[..., dict[str, np.ndarray]]:
    """``make_cifar(root, num_classes, per_class_train, per_class_test)`` -> arrays in file order."""
    return make_cifar_files


# --------------------------------------------------------------------------------------------------
# IDX files (MNIST layout)
# --------------------------------------------------------------------------------------------------

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx_file(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """IDX: 0x00 0x00, type code, ndim, big-endian uint32 dims, then big-endian C-order data."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, _IDX_CODES[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(big).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)


def make_mnist_files(
    folder: Path,
    per_class_train: int | Sequence[int],
    per_class_test: int | Sequence[int],
    seed: int = 0,
    size: int = 28,
) -> dict[str, np.ndarray]:
    """Write the four MNIST .gz IDX files into ``folder``; return the arrays in file order."""
    rng = np.random.default_rng(seed)
    y_train = _labels_in_file_order(_per_class(per_class_train, 10), rng).astype(np.uint8)
    y_test = _labels_in_file_order(_per_class(per_class_test, 10), rng).astype(np.uint8)
    x_train = rng.integers(0, 256, size=(len(y_train), size, size), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(len(y_test), size, size), dtype=np.uint8)
    for stem, array in zip(IDX_STEMS, (x_train, y_train, x_test, y_test), strict=True):
        write_idx_file(folder / f"{stem}.gz", array)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture
def write_idx() -> Callable[..., None]:
    """``write_idx(path, array, compress=True)`` writes one IDX file in the original format."""
    return write_idx_file


@pytest.fixture
def make_mnist() -> Callable[..., dict[str, np.ndarray]]:
    """``make_mnist(folder, per_class_train, per_class_test)`` -> arrays in file order."""
    return make_mnist_files


# --------------------------------------------------------------------------------------------------
# Real data (../shared/data, the Debian Fashion-MNIST package)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_cifar10_root() -> Path:
    """A data root holding the real CIFAR-10 (cifar-10-batches-py/), built once by
    ../shared/data/get_cifar10.py and kept in ~/.cache/wbsweep-test/cifar10 between runs
    (WBSWEEP_TEST_CACHE overrides the cache folder)."""
    cache = Path(os.environ.get("WBSWEEP_TEST_CACHE", "~/.cache/wbsweep-test")).expanduser() / "cifar10"
    folder = cache / "cifar-10-batches-py"
    if all((folder / name).is_file() for name in CIFAR10_FILES):
        return cache
    script = SHARED_DATA / "get_cifar10.py"
    if not script.is_file():
        pytest.skip(f"real CIFAR-10 unavailable: {script} does not exist")
    if shutil.which("npm") is None:
        pytest.skip("real CIFAR-10 unavailable: get_cifar10.py needs npm, which is not installed")
    cache.mkdir(parents=True, exist_ok=True)
    # Build into a scratch folder and move it in whole, so an interrupted run leaves no half cache.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        proc = subprocess.run([sys.executable, str(script), scratch], capture_output=True, text=True,
                              timeout=1200)
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout).split())[-300:]
            if "npm" in tail or "No module named" in tail:
                pytest.skip(f"real CIFAR-10 unavailable: get_cifar10.py failed: {tail}")
            pytest.fail(f"get_cifar10.py failed: {tail}")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(Path(scratch) / "cifar-10-batches-py", folder)
    return cache


@pytest.fixture(scope="session")
def real_mnist_root() -> Path:
    """The shared data folder, which holds the original MNIST IDX files in mnist/."""
    if not all((SHARED_DATA / "mnist" / f"{stem}.gz").is_file() for stem in IDX_STEMS):
        pytest.skip(f"real MNIST unavailable: the four IDX .gz files are not in {SHARED_DATA / 'mnist'}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_fashion_mnist_root() -> Path:
    """/usr/share/datasets, where Debian's dataset-fashion-mnist puts fashion-mnist/*.gz."""
    root = Path("/usr/share/datasets")
    if not all((root / "fashion-mnist" / f"{stem}.gz").is_file() for stem in IDX_STEMS):
        pytest.skip("real Fashion-MNIST unavailable: apt-get install dataset-fashion-mnist to provide it")
    return root


@pytest.fixture()
def one_thread():
    """torch on one thread for the test (timing-free comparisons of trainers), restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _node_caches_in_a_temp_folder(tmp_path_factory):
    """The per-node dataset cache and scratch folders of this test session (and of the sweeps it
    starts, which inherit the environment) live in its temporary folder, not in /tmp for good; so
    does this machine's record of ``fuse: auto``'s measurements (the session's first fused sweep
    measures, the others read it: orchestrator/sweep/fusion.py)."""
    base = tmp_path_factory.mktemp("node")
    saved = {k: os.environ.get(k) for k in ("WBSWEEP_DATA_CACHE", "WBSWEEP_SCRATCH", "WBSWEEP_FUSION_CACHE")}
    os.environ["WBSWEEP_DATA_CACHE"] = str(base / "data-cache")
    os.environ["WBSWEEP_SCRATCH"] = str(base / "scratch")
    os.environ["WBSWEEP_FUSION_CACHE"] = str(base / "fusion.json")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --------------------------------------------------------------------------------------------------
# Ray: one cluster for the session's sweeps that do not test Ray's own start or death
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def _shared_ray(_node_caches_in_a_temp_folder) -> Iterator[RayCluster]:
    """``ray start --head`` once for the session, in a temp folder of its own (short: Ray's socket
    paths must fit in 107 bytes) and a session of its own, so that no test's kill reaches it: tests
    kill their own process groups, or processes that name their own temp folders or node ids.

    A sweep that joins a running cluster instead of starting its own saves the cluster's start
    (seconds of GCS, raylet and agents per sweep). What else differs, and why the sweeps moved here
    do not depend on it (orchestrator/sweep/ray_start.py, cluster.py, fusion.py):

    * ``--no-monitor``: no autoscaler process, so the sweep sees a fixed cluster of live nodes, as on
      its own local cluster (with one, it would take the cluster for an autoscaling one whose node
      types it cannot read, and keep 16 trials pending instead of as many as the node holds);
    * a trial needing more than any node has is not refused at the start (a fixed remote cluster may
      still gain such a node): the tests of that refusal start their own cluster;
    * ``fuse: auto`` keeps its measurements in the results folder only, not in the machine's record
      (``$WBSWEEP_FUSION_CACHE``): a sweep here measures its K once (a Ray task of seconds) where a
      local one may find it recorded;
    * the trials run in worker processes of this cluster, with the environment of this fixture (the
      session's data cache and scratch folders, PYTHONPATH), not the command's: a test that hands the
      trials an environment variable (crash injection, S3 credentials, a scratch folder) starts its own.

    The cluster gets as many CPUs as a local one would (Ray counts them the same way); its processes
    are killed at the end of the session, whatever happened."""
    temp = Path(tempfile.mkdtemp(prefix="wbsh", dir="/tmp"))
    port = _free_port()
    repo = str(Path(__file__).resolve().parents[1])
    # PYTHONPATH: the workers import the tree under test, wherever pip's editable install points.
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": pythonpath}
    # Token authentication (Ray's default for `ray start` since 2.59) needs a token on disk before
    # `ray start`; this creates ~/.ray/auth_token only where none exists.
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    try:
        proc = subprocess.run(["ray", "start", "--head", f"--port={port}", "--no-monitor", "--include-dashboard=false",
                               f"--temp-dir={temp}", "--disable-usage-stats"], env=env, capture_output=True,
                              text=True, timeout=180, start_new_session=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        yield RayCluster(f"127.0.0.1:{port}", env, temp)
    finally:
        kill_tree(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_cluster(_shared_ray: RayCluster) -> RayCluster:
    """The session's shared Ray cluster (see ``_shared_ray``), checked alive before each test that
    uses it, so that a test that broke it is named by the next one."""
    from orchestrator.sweep.cluster import check_reachable

    check_reachable(_shared_ray.address, "the session's shared Ray cluster")
    return _shared_ray


@pytest.fixture(scope="session")
def wbsweep_list() -> subprocess.CompletedProcess:
    """One `wbsweep list` (a process of its own), read by the tests of what it lists."""
    return wbsweep("list", timeout=300)


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted `wbsweep run table4 --preset smoke` through a real local Ray cluster,
    shared by the end-to-end tests (its results are also the reference for the resilience tests).
    ``fuse: auto`` with a machine record of its own: this sweep measures its K (a Ray task)."""
    out = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "WBSWEEP_FUSION_CACHE": str(out.parent / f"{out.name}-fusion.json")}
    proc = wbsweep("run", "table4", "--preset", "smoke", "--out", str(out), env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="session")
def smoke_reference(smoke_sweep) -> pd.DataFrame:
    """The rows of the uninterrupted smoke sweep, sorted by helpers.KEY: what an interrupted and
    resumed sweep must end with (helpers.assert_same_rows)."""
    out, _ = smoke_sweep
    return sorted_rows(out)


@pytest.fixture
def forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to make every read of a tensor's value on the host fail (``item``, ``tolist``,
    ``float(t)``, ...) until ``monkeypatch.undo()``: on a GPU each such read would wait for the
    device, and none may happen inside a captured CUDA graph."""
    import torch

    def host_read(*args: object, **kwargs: object) -> object:
        raise AssertionError("a host read inside the epoch")

    def forbid() -> None:
        for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, host_read)

    return forbid


@pytest.fixture
def float64(monkeypatch: pytest.MonkeyPatch):
    """Everything in float64 (exactness tests of the fused trainer against train() alone, where
    float32 rounding grows chaotically): the default dtype (models, normalised images, losses), the ETF matrix
    (built in float64, stored float32) and train()'s float32 casts of features and logits for the loss
    (``Tensor.float()`` leaves float64 as it is)."""
    import torch

    import trainables.heads as heads

    etf = heads.etf_matrix
    monkeypatch.setattr(heads, "etf_matrix", lambda *a, **k: etf(*a, **k).double())
    to_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda self, *a, **k: self if self.dtype == torch.float64 else to_float(self, *a, **k))
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture
def crash_fused_group() -> Callable[..., None]:
    """``crash_fused_group(configs, outs, epoch, seeds=None)``: train the configs as one fused group in
    a process of its own, killed (``WBSWEEP_INJECT_CRASH``: exit status 17) at the end of ``epoch``,
    after the runs' checkpoints (``seeds``: ``WBSWEEP_INJECT_CRASH_SEEDS``)."""

    def crash(configs: list[dict], outs: list[Path], epoch: int, seeds: str | None = None) -> None:
        script = ("import json, sys; from trainables.fused import train_fused; "
                  "train_fused(json.loads(sys.argv[1]), sys.argv[2:])")
        env = {**os.environ, "WBSWEEP_INJECT_CRASH": str(epoch)}
        if seeds is not None:
            env["WBSWEEP_INJECT_CRASH_SEEDS"] = seeds
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(configs), *map(str, outs)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 17, proc.stderr[-2000:]

    return crash


# --------------------------------------------------------------------------------------------------
# A sweep's stage graph driven by hand (no Ray cluster, no MLflow)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_graph():
    """``offline_graph(sweep)`` -> the :class:`~orchestrator.sweep.graph.StageGraph` of a
    :class:`~orchestrator.sweep.driver.Sweep`, with its real context but no tracking (MLflow's part is
    not run): a test calls ``suggest`` and ``on_trial_complete`` as Ray Tune would."""
    from orchestrator.sweep.graph import StageGraph

    def make(sweep):
        return StageGraph(sweep.context(tracker=None, outbox=lambda what, call: None), sweep.fusion)

    return make
