"""A dataset's identity by content (trainables/identity.py): MNIST's and Fashion-MNIST's files have
the same names, so real Fashion-MNIST files where mnist-lt looks are refused in one line naming what
they are, through the loader, the node's data cache and the command line; real MNIST is verified;
files of unknown content (those the tests write) still load."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.conftest import IDX_STEMS
from trainables.data import load_dataset
from trainables.datacache import cached_dataset
from trainables.errors import WbsweepError
from trainables.identity import check_identity
from trainables.readers import _find_idx

pytestmark = pytest.mark.realdata


def place(src: Path, folder: Path, unpack: bool = False) -> Path:
    """Copy the four IDX files of ``src`` into ``folder`` (real copies; ``unpack``: uncompressed, as
    torchvision leaves them in MNIST/raw)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in IDX_STEMS:
        if unpack:
            (folder / stem).write_bytes(gzip.decompress((src / f"{stem}.gz").read_bytes()))
        else:
            shutil.copyfile(src / f"{stem}.gz", folder / f"{stem}.gz")
    return folder


@pytest.mark.parametrize("where,unpack", [("mnist", False), ("MNIST/raw", True)])
def test_fashion_mnist_files_under_the_mnist_name_are_refused(real_fashion_mnist_root, tmp_path, where, unpack):
    folder = place(real_fashion_mnist_root / "fashion-mnist", tmp_path / where, unpack)
    with pytest.raises(WbsweepError) as err:
        load_dataset("mnist-lt", data_root=tmp_path, download=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"the files in {folder} are Fashion-MNIST's, not MNIST's" in message
    assert "fashion-mnist-lt" in message  # what to do instead


def test_mnist_files_under_the_fashion_name_are_refused(real_mnist_root, tmp_path):
    folder = place(real_mnist_root / "mnist", tmp_path / "fashion-mnist")
    with pytest.raises(WbsweepError, match=f"the files in {folder} are MNIST's, not Fashion-MNIST's"):
        load_dataset("fashion-mnist-lt", data_root=tmp_path, download=False)


def test_one_foreign_file_is_named(real_mnist_root, real_fashion_mnist_root, tmp_path):
    folder = place(real_mnist_root / "mnist", tmp_path / "mnist")
    shutil.copyfile(real_fashion_mnist_root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz",
                    folder / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(WbsweepError) as err:
        load_dataset("mnist-lt", data_root=tmp_path, download=False)
    assert f"t10k-images-idx3-ubyte.gz in {folder} is Fashion-MNIST's, not MNIST's" in str(err.value)


def test_the_real_releases_are_verified(real_mnist_root, real_fashion_mnist_root):
    from trainables.readers import _read_idx_images

    for key, root in (("mnist", real_mnist_root / "mnist"),
                      ("fashion-mnist", real_fashion_mnist_root / "fashion-mnist")):
        files = _find_idx(root, ("",))
        sums = {p: _read_idx_images(p, labels=i % 2 == 1)[1] for i, p in enumerate(files)}
        assert check_identity(key, sums, "") == "verified"
        # the sum is the uncompressed file's, as `gunzip -c FILE | sha256sum` prints it
        assert sums[files[1]] == hashlib.sha256(gzip.decompress(files[1].read_bytes())).hexdigest()
    assert load_dataset("mnist-lt", data_root=real_mnist_root, download=False).num_classes == 10


def test_unknown_content_loads_and_is_told_apart_by_its_fingerprint(make_mnist, tmp_path):
    """Files of no known dataset (random pixels, as the tests write) are accepted: they cannot be
    mistaken for a known dataset, and data_fingerprint records what they were."""
    from trainables.readers import _read_idx_images

    make_mnist(tmp_path / "mnist", 40, 10)
    files = _find_idx(tmp_path, ("mnist",))
    assert check_identity("mnist", {p: _read_idx_images(p, i % 2 == 1)[1] for i, p in enumerate(files)}, "") \
        == "unknown"
    assert len(load_dataset("mnist-lt", data_root=tmp_path, rho=10, download=False).y_test) == 100


def test_the_data_cache_checks_files_that_changed_since(real_mnist_root, real_fashion_mnist_root, tmp_path,
                                                        monkeypatch):
    """An entry of the node's data cache is keyed by each file's size and mtime: Fashion-MNIST's files
    copied over MNIST's after MNIST was prepared are read, and refused, not served from the cache."""
    monkeypatch.setenv("WBSWEEP_DATA_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    place(real_mnist_root / "mnist", root / "mnist")
    assert cached_dataset("mnist-lt", root).num_classes == 10
    assert any((tmp_path / "cache").iterdir())
    place(real_fashion_mnist_root / "fashion-mnist", root / "mnist")
    with pytest.raises(WbsweepError, match="are Fashion-MNIST's, not MNIST's"):
        cached_dataset("mnist-lt", root)


@pytest.mark.slow
def test_real_cifar10_is_verified(real_cifar10_root):
    from trainables.readers import _read_cifar_file

    folder = real_cifar10_root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    sums = {folder / n: _read_cifar_file(folder / n, "labels", 10, "")[2] for n in names}
    assert check_identity("cifar10", sums, "") == "verified"


SPEC = """name: mine
methods:
  - {method: wd, la: [none]}
presets:
  p:
    train: {dataset: mnist-lt, model: mlp3, epochs: 1, lr: 0.01, width: 16}
    seeds: [0]
"""


def test_a_sweep_on_fashion_files_named_mnist_is_one_line_and_exit_2(real_fashion_mnist_root, tmp_path, capsys):
    place(real_fashion_mnist_root / "fashion-mnist", tmp_path / "data" / "mnist")
    (tmp_path / "mine.yaml").write_text(SPEC)
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "mine.yaml"), "--out", str(out), "--data-root", str(tmp_path / "data")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "are Fashion-MNIST's, not MNIST's" in lines[0]
    assert not (out / "results").exists()
