"""Tests of trainables.data: the LT split arithmetic, the file readers and every user-facing error.

Fake datasets are written in the exact on-disk formats by tests/conftest.py; the real-data tests
use ../shared/data and Debian's Fashion-MNIST package where present and skip with a reason where not.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables import readers
from trainables.data import (
    LTDataset,
    class_groups,
    dataset_info,
    dataset_names,
    default_data_root,
    load_dataset,
    lt_counts,
    read_idx,
)
from trainables.errors import WbsweepError

ALL_NAMES = ["cifar10", "cifar10-lt", "cifar100", "cifar100-lt", "digits", "digits-lt",
             "fashion-mnist", "fashion-mnist-lt", "mini-imagenet", "mini-imagenet-lt", "mnist", "mnist-lt"]


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not depend on the developer's WBSWEEP_DATA_ROOT."""
    monkeypatch.delenv("WBSWEEP_DATA_ROOT", raising=False)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace both downloaders with ones that fail like an offline machine; record the URLs."""
    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(readers, "_download_archive", offline)
    monkeypatch.setattr(readers, "_download_file", offline)
    return calls


def by_class_in_file_order(labels: np.ndarray, k: int) -> np.ndarray:
    return np.flatnonzero(labels == k)


def formula_counts(n_max: int, num_classes: int, rho: float) -> list[int]:
    """The LT profile computed independently of the module, with a plain loop."""
    out = []
    for k in range(num_classes):
        out.append(round(n_max * rho ** (-k / (num_classes - 1))))
    return out


# --------------------------------------------------------------------------------------------------
# lt_counts / class_groups
# --------------------------------------------------------------------------------------------------


def test_lt_counts_cifar100_rho100() -> None:
    counts = lt_counts(480, 100, 100)
    assert len(counts) == 100
    assert counts[:10] == [480, 458, 437, 417, 399, 380, 363, 347, 331, 316]
    assert counts[-1] == 5
    assert sum(counts) == 10_457
    assert counts == formula_counts(480, 100, 100.0)
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_lt_counts_cifar100_rho10() -> None:
    counts = lt_counts(480, 100, 10)
    assert counts == formula_counts(480, 100, 10.0)
    # Hand-checked: 480 * 10 ** (-11/99) = 372.4, 480 * 10 ** (-1) = 48.
    assert counts[0] == 480 and counts[11] == 372 and counts[99] == 48
    assert sum(counts) == 18_840


def test_lt_counts_cifar10_rho100_and_rho10() -> None:
    assert lt_counts(4980, 10, 100) == [4980, 2985, 1790, 1073, 643, 386, 231, 139, 83, 50]
    assert sum(lt_counts(4980, 10, 100)) == 12_360
    assert lt_counts(4980, 10, 10) == [4980, 3856, 2985, 2312, 1790, 1386, 1073, 831, 643, 498]
    assert lt_counts(4980, 10, 10) == formula_counts(4980, 10, 10.0)


def test_lt_counts_uses_python_round_not_int() -> None:
    # 5 * 2 ** -1 = 2.5 -> round() gives 2 (half to even); 7 * 0.5 = 3.5 -> 4. int() would give 2, 3.
    assert lt_counts(5, 2, 2.0) == [5, 2]
    assert lt_counts(7, 2, 2.0) == [7, 4]
    # CIFAR100: 480 * 100 ** (-1/99) = 458.05...; the authors' int() variant differs elsewhere.
    assert lt_counts(480, 100, 100) != [int(480 * 100 ** (-k / 99)) for k in range(100)]


def test_lt_counts_edge_cases() -> None:
    assert lt_counts(50, 4, 1) == [50, 50, 50, 50]
    assert lt_counts(50, 1, 100) == [50]
    for bad_rho in (0.5, 0, -3, float("nan"), float("inf")):
        with pytest.raises(WbsweepError, match="rho"):
            lt_counts(50, 10, bad_rho)
    with pytest.raises(WbsweepError, match="num_classes"):
        lt_counts(50, 0, 10)
    with pytest.raises(WbsweepError, match="n_max"):
        lt_counts(-1, 10, 10)


def test_class_groups_strict_thresholds() -> None:
    assert class_groups([101, 100, 50, 20, 19], 100, 20) == ["many", "medium", "medium", "medium", "few"]
    assert class_groups([1001, 1000, 200, 199], 1000, 200) == ["many", "medium", "medium", "few"]
    with pytest.raises(WbsweepError, match="few_threshold"):
        class_groups([5], 10, 20)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_registry_names_and_info() -> None:
    assert dataset_names() == ALL_NAMES
    info = dataset_info("cifar100-lt")
    assert info["num_classes"] == 100 and info["image_shape"] == (3, 32, 32)
    assert info["default_rho"] == 100 and (info["many_threshold"], info["few_threshold"]) == (100, 20)
    assert "cifar-100-python" in info["source"]
    assert dataset_info("cifar10")["default_rho"] == 1
    cifar10 = dataset_info("cifar10-lt")
    assert (cifar10["many_threshold"], cifar10["few_threshold"]) == (1000, 200)
    assert dataset_info("mnist-lt")["few_threshold"] == 200
    digits = dataset_info("digits-lt")
    assert digits["default_rho"] == 10 and digits["needs_files"] is False
    assert digits["image_shape"] == (1, 8, 8)
    assert (digits["many_threshold"], digits["few_threshold"]) == (50, 20)
    assert dataset_info("CIFAR100_LT")["name"] == "cifar100-lt"  # lenient spelling maps to the canonical name


@pytest.mark.parametrize("typo, guess", [
    ("cifar100lt", "cifar100-lt"), ("fashion-mnst-lt", "fashion-mnist-lt"), ("digit-lt", "digits-lt"),
])
def test_unknown_dataset_suggests_closest(typo: str, guess: str) -> None:
    for call in (lambda: load_dataset(typo), lambda: dataset_info(typo)):
        with pytest.raises(WbsweepError) as err:
            call()
        message = str(err.value)
        assert f"did you mean {guess!r}" in message
        assert "cifar10-lt" in message and "digits" in message  # the valid list
        assert "\n" not in message


def test_unknown_dataset_without_close_match() -> None:
    with pytest.raises(WbsweepError, match="unknown dataset 'imagenet21k'.*valid names"):
        load_dataset("imagenet21k")


# --------------------------------------------------------------------------------------------------
# CIFAR (fake files in the exact format)
# --------------------------------------------------------------------------------------------------


def test_fake_cifar_files_have_the_original_format(tmp_path: Path, make_cifar) -> None:
    """The fixture itself: Python 2 strings and numpy.core arrays, loadable by plain pickle."""
    arrays = make_cifar(tmp_path, 10, 3, 2)
    raw = (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    assert raw.startswith(b"\x80\x02}")
    assert b"U\x04data" in raw and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        entry = pickle.load(fh, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    np.testing.assert_array_equal(entry[b"data"], arrays["x_test"])
    assert entry[b"labels"] == arrays["y_test"].tolist()


def _check_lt_split(ds: LTDataset, arrays: dict[str, np.ndarray], counts: list[int], val: int) -> None:
    """Train = first n_k of each class in file order, val = the next `val`, test = the whole test file."""
    x_file = arrays["x_train"].reshape(-1, 3, 32, 32)
    y_file = arrays["y_train"]
    train_pos, val_pos = [], []
    for k, n in enumerate(counts):
        members = by_class_in_file_order(y_file, k)
        train_pos += members[:n].tolist()
        val_pos += members[n: n + val].tolist()
    train_pos, val_pos = sorted(train_pos), sorted(val_pos)
    assert ds.class_counts == counts
    np.testing.assert_array_equal(ds.x_train.numpy(), x_file[train_pos])
    np.testing.assert_array_equal(ds.y_train.numpy(), y_file[train_pos])
    np.testing.assert_array_equal(ds.x_val.numpy(), x_file[val_pos])
    np.testing.assert_array_equal(ds.y_val.numpy(), y_file[val_pos])
    np.testing.assert_array_equal(ds.x_test.numpy(), arrays["x_test"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])
    np.testing.assert_array_equal(ds.indices["train"], train_pos)
    np.testing.assert_array_equal(ds.indices["val"], val_pos)
    assert np.bincount(ds.y_train.numpy(), minlength=ds.num_classes).tolist() == counts
    assert np.bincount(ds.y_val.numpy(), minlength=ds.num_classes).tolist() == [val] * ds.num_classes
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.uint8 and x.is_contiguous() and x.device.type == "cpu"
        assert x.shape[1:] == (3, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (len(x),)


def test_cifar10_lt_split_from_fake_files(tmp_path: Path, make_cifar) -> None:
    arrays = make_cifar(tmp_path, 10, 520, 30)
    ds = load_dataset("cifar10-lt", data_root=tmp_path, rho=10, download=False)
    expected = [round(500 * 10 ** (-k / 9)) for k in range(10)]  # n_max = 520 - 20 from the files
    assert expected[:3] == [500, 387, 300]
    _check_lt_split(ds, arrays, expected, 20)
    assert ds.name == "cifar10-lt" and ds.num_classes == 10 and len(ds.y_test) == 300
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    assert ds.augment == "crop_flip" and (ds.many_threshold, ds.few_threshold) == (1000, 200)
    assert ds.groups() == class_groups(expected, 1000, 200)
    assert ds.groups()[0] == "medium" and ds.groups()[-1] == "few"
    np.testing.assert_allclose(ds.prior, np.array(expected) / sum(expected))
    assert ds.prior.dtype == np.float64
    assert "cifar10-lt" in repr(ds) and "train=" in repr(ds)


def test_cifar10_default_rho_and_balanced_name(tmp_path: Path, make_cifar) -> None:
    arrays = make_cifar(tmp_path, 10, 60, 5)
    # Default rho 100 with n_max 40: 40 * 100 ** -1 = 0.4 rounds to 0 images for the last class.
    with pytest.raises(WbsweepError, match="class 9 no training images"):
        load_dataset("cifar10-lt", data_root=tmp_path, download=False)
    lt = load_dataset("cifar10-lt", data_root=tmp_path, rho=50, download=False)
    assert lt.class_counts == formula_counts(40, 10, 50.0) and lt.class_counts[-1] == 1
    balanced = load_dataset("cifar10", data_root=tmp_path, download=False)
    _check_lt_split(balanced, arrays, [40] * 10, 20)
    same = load_dataset("cifar10-lt", data_root=tmp_path, rho=1, download=False)
    assert same.class_counts == balanced.class_counts
    assert torch.equal(same.x_train, balanced.x_train)
    smaller_val = load_dataset("cifar10", data_root=tmp_path, val_per_class=5, download=False)
    _check_lt_split(smaller_val, arrays, [55] * 10, 5)


def test_cifar100_lt_split_from_fake_files(tmp_path: Path, make_cifar) -> None:
    arrays = make_cifar(tmp_path, 100, 60, 4)
    ds = load_dataset("cifar100-lt", data_root=tmp_path, rho=10, download=False)
    expected = formula_counts(40, 100, 10.0)
    assert expected[0] == 40 and expected[-1] == 4
    _check_lt_split(ds, arrays, expected, 20)
    assert ds.num_classes == 100 and len(ds.y_test) == 400
    assert ds.std == (0.2023, 0.1994, 0.2010) and ds.mean == (0.4914, 0.4822, 0.4465)
    assert (ds.many_threshold, ds.few_threshold) == (100, 20)
    assert ds.groups() == ["medium" if n >= 20 else "few" for n in expected]


def test_cifar_reads_python3_style_pickles(tmp_path: Path) -> None:
    """Files rebuilt under Python 3 (str keys, numpy._core, _codecs-encoded buffers) also load."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, per in (("train", 22), ("test", 1)):
        y = rng.permutation(np.repeat(np.arange(100), per))
        entry = {"data": rng.integers(0, 256, (len(y), 3072), dtype=np.uint8), "fine_labels": y.tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    ds = load_dataset("cifar100", data_root=tmp_path, download=False)
    assert ds.class_counts == [2] * 100 and len(ds.y_val) == 2000 and len(ds.y_test) == 100


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("keys", ["bytes", "str"])
def test_cifar_pickles_of_every_protocol_load(tmp_path: Path, make_cifar, protocol: int, keys: str) -> None:
    """Re-saved files (any protocol 0-5, bytes or str keys) read as the originals: torchvision's
    reader (a plain pickle.load) accepts them all, and so must ours."""
    arrays = make_cifar(tmp_path / "orig", 10, 30, 2)
    reference = load_dataset("cifar10", data_root=tmp_path / "orig", download=False)
    folder = tmp_path / "resaved" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / "orig" / "cifar-10-batches-py" / name, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
        entry = {(k.decode() if keys == "str" else k): v for k, v in entry.items()}
        entry[b"data" if keys == "bytes" else "data"] = np.asarray(entry[b"data" if keys == "bytes" else "data"])
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=protocol)
    ds = load_dataset("cifar10", data_root=tmp_path / "resaved", download=False)
    assert torch.equal(ds.x_train, reference.x_train) and torch.equal(ds.y_test, reference.y_test)
    assert len(arrays["y_train"]) == 300


@pytest.mark.parametrize("core", ["numpy.core", "numpy._core"])
def test_cifar_pickles_of_either_numpy_major_version_load(tmp_path: Path, core: str) -> None:
    """numpy 1.x writes numpy.core.multiarray, 2.x numpy._core.multiarray: both read under either."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        blob = pickle.dumps({b"data": np.full((60, 3072), 7, np.uint8), b"labels": list(range(10)) * 6}, protocol=2)
        for spelled in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
            blob = blob.replace(spelled, core.encode() + b".multiarray")
        (folder / name).write_bytes(blob)
    ds = load_dataset("cifar10", data_root=tmp_path, download=False)
    assert int(ds.x_train.float().mean()) == 7


def test_data_root_from_environment(tmp_path: Path, make_cifar, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar(tmp_path, 10, 30, 2)
    monkeypatch.setenv("WBSWEEP_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    assert load_dataset("cifar10", download=False).class_counts == [10] * 10
    monkeypatch.delenv("WBSWEEP_DATA_ROOT")
    assert default_data_root() == Path.home() / ".cache" / "wbsweep" / "data"


def test_a_relative_data_root_is_made_absolute_where_it_is_read(tmp_path: Path, make_cifar, monkeypatch) -> None:
    """Trials run in their own working folders: a relative WBSWEEP_DATA_ROOT means the folder it
    names from where the command was started."""
    make_cifar(tmp_path / "data", 10, 30, 2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WBSWEEP_DATA_ROOT", "data")
    assert default_data_root() == tmp_path / "data" and default_data_root().is_absolute()
    monkeypatch.setenv("WBSWEEP_DATA_ROOT", "~/x")
    assert default_data_root() == Path.home() / "x"


def test_cifar_download_path_when_the_network_works(tmp_path: Path, make_cifar,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, Path, str]] = []

    def fake_download(url: str, root: Path, md5: str) -> None:
        seen.append((url, root, md5))
        make_cifar(root, 100, 21, 1)

    monkeypatch.setattr(readers, "_download_archive", fake_download)
    root = tmp_path / "fresh" / "root"
    ds = load_dataset("cifar100-lt", data_root=root, rho=1)
    assert seen == [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", root,
                     "eb9058c3a382ffc7106e4002c42a8d85")]
    assert ds.class_counts == [1] * 100
    load_dataset("cifar100", data_root=root)  # files present now: no second download
    assert len(seen) == 1


# --------------------------------------------------------------------------------------------------
# CIFAR error cases
# --------------------------------------------------------------------------------------------------


def test_missing_cifar_files_without_download(tmp_path: Path) -> None:
    with pytest.raises(WbsweepError) as err:
        load_dataset("cifar10-lt", data_root=tmp_path, download=False)
    message = str(err.value)
    assert "data_batch_1" in message and "test_batch" in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message and "--data-root" in message
    assert "\n" not in message


def test_missing_cifar_files_offline_download(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(WbsweepError) as err:
        load_dataset("cifar100-lt", data_root=tmp_path / "cache")
    message = str(err.value)
    assert no_network == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert "downloading them failed" in message and "name resolution" in message
    assert "train" in message and str(tmp_path / "cache" / "cifar-100-python") in message
    assert "\n" not in message


def test_one_cifar_batch_missing(tmp_path: Path, make_cifar) -> None:
    make_cifar(tmp_path, 10, 30, 2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(WbsweepError, match=r"missing data_batch_3 in"):
        load_dataset("cifar10-lt", data_root=tmp_path, download=False)


def test_data_root_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "data.tar"
    not_a_dir.write_text("x")
    for name in ("cifar10-lt", "mnist-lt"):
        with pytest.raises(WbsweepError, match="is a file, not a folder"):
            load_dataset(name, data_root=not_a_dir)
    # digits reads no files, so a stale data root does not matter to it.
    assert load_dataset("digits-lt", data_root=not_a_dir).class_counts[0] == 104


def test_truncated_cifar_pickle(tmp_path: Path, make_cifar) -> None:
    make_cifar(tmp_path, 10, 30, 2)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WbsweepError) as err:
        load_dataset("cifar10-lt", data_root=tmp_path, download=False)
    assert str(path) in str(err.value) and "corrupt or truncated" in str(err.value)


def test_garbage_and_foreign_cifar_pickles(tmp_path: Path, make_cifar) -> None:
    make_cifar(tmp_path, 10, 30, 2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(WbsweepError, match="test_batch is corrupt"):
        load_dataset("cifar10-lt", data_root=tmp_path, download=False)
    # A pickle that would import something other than numpy is refused, not executed.
    with open(path, "wb") as fh:
        pickle.dump({b"data": Path("/etc/passwd"), b"labels": []}, fh, protocol=2)
    with pytest.raises(WbsweepError, match=r"unsupported variant of the format \(it references pathlib"):
        load_dataset("cifar10-lt", data_root=tmp_path, download=False)
    with open(path, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
    with pytest.raises(WbsweepError, match=r"expected uint8 \[n, 3072\]"):
        load_dataset("cifar10-lt", data_root=tmp_path, download=False)
    with open(path, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, fh, protocol=2)
    with pytest.raises(WbsweepError, match=r"labels outside 0\.\.9"):
        load_dataset("cifar10-lt", data_root=tmp_path, download=False)
    with open(path, "wb") as fh:
        pickle.dump({b"pixels": np.zeros((2, 3072), np.uint8)}, fh, protocol=2)
    with pytest.raises(WbsweepError, match="lacks the 'data' or 'labels' entry"):
        load_dataset("cifar10-lt", data_root=tmp_path, download=False)


@pytest.mark.parametrize("rho", [0.5, 0, -1, float("nan")])
def test_rho_below_one_rejected_before_reading(tmp_path: Path, rho: float) -> None:
    with pytest.raises(WbsweepError, match="rho must be"):
        load_dataset("cifar10-lt", data_root=tmp_path, rho=rho, download=False)


def test_bad_val_per_class(tmp_path: Path, make_cifar) -> None:
    make_cifar(tmp_path, 10, 30, 2)
    with pytest.raises(WbsweepError, match="val_per_class must be"):
        load_dataset("cifar10-lt", data_root=tmp_path, val_per_class=-1, download=False)
    with pytest.raises(WbsweepError, match="leaves no training images"):
        load_dataset("cifar10-lt", data_root=tmp_path, val_per_class=30, download=False)


# --------------------------------------------------------------------------------------------------
# IDX and MNIST-like datasets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path: Path, write_idx, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    ints = rng.integers(-(2**31), 2**31 - 1, (4, 2)).astype(np.int32)
    for name, array in (("img", images), ("lab", labels), ("int", ints)):
        write_idx(tmp_path / name, array, compress=compress)
        back = read_idx(tmp_path / name)
        np.testing.assert_array_equal(back, array)
        assert back.dtype == array.dtype and back.flags.writeable
    raw = (tmp_path / "img").read_bytes()
    raw = gzip.decompress(raw) if compress else raw
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:16] == b"\x00\x00\x00\x07\x00\x00\x00\x05\x00\x00\x00\x03"


def test_idx_errors_name_the_file(tmp_path: Path, write_idx) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(WbsweepError) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "cannot read IDX file" in str(err.value)
    # A complete gzip whose IDX payload is short of what the header promises.
    path.write_bytes(gzip.compress(gzip.decompress(good)[:-10]))
    with pytest.raises(WbsweepError, match=r"data bytes but its header \[50, 28, 28\]"):
        read_idx(path)
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00\x00"))
    with pytest.raises(WbsweepError, match="truncated inside its header"):
        read_idx(path)
    path.write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(WbsweepError, match="is not an IDX file"):
        read_idx(path)
    path.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(WbsweepError, match="cannot read IDX file"):
        read_idx(path)


UNEVEN = [50, 70, 60, 60, 60, 60, 60, 60, 60, 60]  # 600 images: N/C = 60, class 0 has only 50


@pytest.mark.parametrize("name, folder", [("mnist-lt", "MNIST/raw"), ("mnist-lt", "mnist"), ("mnist-lt", ""),
                                          ("fashion-mnist-lt", "FashionMNIST/raw"),
                                          ("fashion-mnist-lt", "fashion-mnist"), ("fashion-mnist-lt", "")])
def test_mnist_like_split_with_cap(tmp_path: Path, make_mnist, name: str, folder: str) -> None:
    arrays = make_mnist(tmp_path / folder, UNEVEN, 3)
    ds = load_dataset(name, data_root=tmp_path, rho=10, download=False)
    # n_max = 600 / 10 - 20 = 40; class 0 is capped at 50 - 20 = 30 so its 20 val images exist.
    expected = [min(n, a - 20) for n, a in zip(formula_counts(40, 10, 10.0), UNEVEN, strict=True)]
    assert expected[:3] == [30, 31, 24]
    assert ds.class_counts == expected
    y_file = arrays["y_train"]
    train_pos = sorted(p for k, n in enumerate(expected) for p in by_class_in_file_order(y_file, k)[:n])
    val_pos = sorted(p for k, n in enumerate(expected) for p in by_class_in_file_order(y_file, k)[n: n + 20])
    np.testing.assert_array_equal(ds.x_train.numpy()[:, 0], arrays["x_train"][train_pos])
    np.testing.assert_array_equal(ds.x_val.numpy()[:, 0], arrays["x_train"][val_pos])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert ds.x_train.shape[1:] == (1, 28, 28) and ds.x_test.shape == (30, 1, 28, 28)
    assert ds.y_train.dtype == torch.int64 and ds.x_train.dtype == torch.uint8
    assert ds.augment == "none" and (ds.many_threshold, ds.few_threshold) == (1000, 200)
    if name == "mnist-lt":
        assert ds.mean == (0.1307,) and ds.std == (0.3081,)
    else:
        assert ds.mean == (0.2860,) and ds.std == (0.3530,)
    balanced = load_dataset(name.removesuffix("-lt"), data_root=tmp_path, download=False)
    assert balanced.class_counts == [30] + [40] * 9


def test_mnist_class_too_small_for_validation(tmp_path: Path, make_mnist) -> None:
    make_mnist(tmp_path / "mnist", [20] + [64] * 9, 1)
    with pytest.raises(WbsweepError, match="class 0 has only 20 training images"):
        load_dataset("mnist-lt", data_root=tmp_path, rho=10, download=False)


def test_missing_mnist_files_offline(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(WbsweepError) as err:
        load_dataset("mnist-lt", data_root=tmp_path)
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "MNIST/raw") in message and str(tmp_path / "mnist") in message
    assert "downloading them failed" in message and "\n" not in message
    # Both mirrors are tried for the first file, then it stops: the other files cannot come either.
    assert no_network == ["https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
                          "http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz"]
    with pytest.raises(WbsweepError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist-lt", data_root=tmp_path, download=False)


def test_mnist_download_path_when_the_network_works(tmp_path: Path, make_mnist,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "mirror"
    make_mnist(source, 25, 2)
    fetched: list[str] = []

    def fake_download(url: str, folder: Path, filename: str, md5: str) -> None:
        fetched.append(filename)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / filename).write_bytes((source / filename).read_bytes())

    monkeypatch.setattr(readers, "_download_file", fake_download)
    ds = load_dataset("mnist", data_root=tmp_path / "root")
    assert len(fetched) == 4 and (tmp_path / "root" / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()
    assert ds.class_counts == [5] * 10


def test_corrupt_mnist_file_is_named(tmp_path: Path, make_mnist) -> None:
    make_mnist(tmp_path / "mnist", 25, 2)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WbsweepError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist-lt", data_root=tmp_path, download=False)


# --------------------------------------------------------------------------------------------------
# digits (embedded, real data)
# --------------------------------------------------------------------------------------------------


def test_digits_lt_split() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits-lt")
    assert lt_counts(104, 10, 10) == [104, 81, 62, 48, 37, 29, 22, 17, 13, 10]
    assert ds.class_counts == [104, 81, 62, 48, 37, 29, 22, 17, 13, 10]
    assert ds.groups() == ["many"] * 3 + ["medium"] * 4 + ["few"] * 3
    assert ds.x_train.shape == (423, 1, 8, 8) and ds.x_val.shape == (200, 1, 8, 8)
    assert ds.x_test.shape == (500, 1, 8, 8)
    assert np.bincount(ds.y_test.numpy()).tolist() == [50] * 10
    assert ds.augment == "none" and (ds.many_threshold, ds.few_threshold) == (50, 20)

    y = load_digits().target
    images = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    train, val, test = (ds.indices[s] for s in ("train", "val", "test"))
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    expect_test, expect_train, expect_val = [], [], []
    for k in range(10):
        members = np.flatnonzero(y == k)
        expect_test += members[-50:].tolist()
        expect_train += members[: ds.class_counts[k]].tolist()
        expect_val += members[ds.class_counts[k]: ds.class_counts[k] + 20].tolist()
    assert train.tolist() == sorted(expect_train)
    assert val.tolist() == sorted(expect_val)
    assert test.tolist() == sorted(expect_test)
    np.testing.assert_array_equal(ds.x_train.numpy()[:, 0], images[train])
    np.testing.assert_array_equal(ds.y_test.numpy(), y[test])
    assert int(ds.x_train.max()) == 255


def test_digits_balanced_and_val_size() -> None:
    assert load_dataset("digits").class_counts == [104] * 10
    assert load_dataset("digits", val_per_class=10).class_counts == [114] * 10
    with pytest.raises(WbsweepError, match="leaves no training images"):
        load_dataset("digits", val_per_class=124)


def test_digits_normalisation_constants() -> None:
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images * 255 / 16).astype(np.uint8) / 255.0
    ds = load_dataset("digits-lt")
    assert ds.mean[0] == pytest.approx(pixels.mean(), abs=1e-5)
    assert ds.std[0] == pytest.approx(pixels.std(), abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------

MNIST_TRAIN_PER_CLASS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.slow
@pytest.mark.realdata
def test_real_cifar10_lt(real_cifar10_root: Path) -> None:
    ds = load_dataset("cifar10-lt", data_root=real_cifar10_root, download=False)
    assert ds.class_counts == [4980, 2985, 1790, 1073, 643, 386, 231, 139, 83, 50]
    assert len(ds.y_train) == 12_360 and ds.x_train.shape == (12_360, 3, 32, 32)
    assert len(ds.y_val) == 200 and len(ds.y_test) == 10_000
    assert ds.y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    # The first training images of the file (labels 6, 9, 9, 4, 1) are all among their class's first n_k.
    assert ds.y_train[:5].tolist() == [6, 9, 9, 4, 1]
    assert ds.groups() == ["many"] * 4 + ["medium"] * 3 + ["few"] * 3  # 1073 > 1000; 139 < 200


@pytest.mark.realdata
def test_real_mnist_lt(real_mnist_root: Path) -> None:
    ds = load_dataset("mnist-lt", data_root=real_mnist_root, download=False)
    expected = [min(n, a - 20) for n, a in zip(formula_counts(5980, 10, 100.0), MNIST_TRAIN_PER_CLASS,
                                                strict=True)]
    assert expected[0] == 5903  # the cap: class 0 has 5,923 images, not 6,000
    assert ds.class_counts == expected
    assert len(ds.y_test) == 10_000 and ds.x_test.shape == (10_000, 1, 28, 28) and len(ds.y_val) == 200
    assert ds.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert ds.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    pixels = ds.x_test.double() / 255
    assert pixels.mean().item() == pytest.approx(0.1325, abs=1e-3)  # the test set's own mean


@pytest.mark.realdata
def test_real_fashion_mnist_lt(real_fashion_mnist_root: Path) -> None:
    ds = load_dataset("fashion-mnist-lt", data_root=real_fashion_mnist_root, download=False)
    assert ds.class_counts == formula_counts(5980, 10, 100.0)  # 6,000 per class: no cap
    assert len(ds.y_test) == 10_000 and np.bincount(ds.y_test.numpy()).tolist() == [1000] * 10
    assert ds.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
