"""mini-ImageNet(-LT) prepared from a tiny fake ImageNet training folder that the test writes: the
100 standard synsets, a few JPEG/PNG files each, of assorted sizes and modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainables import mini_imagenet
from trainables.data import check_dataset, dataset_info, load_dataset
from trainables.errors import WbsweepError

PER_SYNSET = 5


def make_fake_imagenet(root: Path, per_synset: int = PER_SYNSET, extra: int = 2) -> Path:
    """ImageNet's train layout: root/<synset>/<synset>_<n>.JPEG, plus a few non-mini synsets and a
    stray file. The colour of each image encodes (class rank, file number) so the test can check
    which file ended where."""
    train = root / "train"
    synsets = sorted(mini_imagenet.SYNSETS)
    for s in [*synsets, *(f"n0000000{k}" for k in range(extra))]:
        folder = train / s
        folder.mkdir(parents=True)
        for n in range(per_synset):
            rank = synsets.index(s) if s in synsets else 255
            colour = (rank, n * 10, 7)
            size = (20 + n, 12 + 2 * n)  # landscape, shorter side 12 + 2n
            im = Image.new("RGB", size, colour)
            if n % 2:
                im.save(folder / f"{s}_{n}.JPEG", quality=100)
            else:
                (im.convert("L") if n == 2 else im).save(folder / f"{s}_{n}.png")
        (folder / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("mini")
    make_fake_imagenet(base / "imagenet")
    mini_imagenet.prepare(base / "imagenet", base / "data" / "mini-imagenet", size=8, seed=0, per_class=(3, 1, 1))
    return base


def test_the_class_list_is_the_standard_one() -> None:
    s = mini_imagenet.SYNSETS
    assert len(s) == len(set(s)) == 100 and all(x.startswith("n") and len(x) == 9 for x in s)
    # a few well-known mini-ImageNet classes (house finch, golden retriever, school bus, ...)
    assert {"n01532829", "n02099601", "n04146614", "n02110341", "n09256479", "n13133613"} <= set(s)
    assert mini_imagenet.classes() == sorted(s)


def test_prepare_writes_lists_images_and_info(prepared: Path) -> None:
    folder = prepared / "data" / "mini-imagenet"
    assert {p.name for p in folder.iterdir()} == set(mini_imagenet.FILES)
    info = json.loads((folder / "split.json").read_text())
    assert info["counts"] == {"train": 300, "val": 100, "test": 100} and info["size"] == 8
    lines = {s: (folder / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}
    files = [ln.split()[0] for s in lines for ln in lines[s]]
    assert len(files) == len(set(files)) == 500  # disjoint splits
    synsets = mini_imagenet.classes()
    for ls in lines.values():
        for ln in ls:
            path, label = ln.split()
            assert path.split("/")[0] == synsets[int(label)]  # label k = k-th synset in sorted order
            assert not path.startswith("n0000000")
    images = np.load(folder / "images-train.npy")
    assert images.shape == (300, 3, 8, 8) and images.dtype == np.uint8
    # the first listed train image: uniform colour (rank, 10 n, 7) -> every pixel of the 8x8 crop
    path, label = lines["train"][0].split()
    n = int(path.rsplit("_", 1)[1].split(".")[0])
    expected = (int(label), 10 * n, 7) if n != 2 else (None,)
    if n != 2:  # file 2 is greyscale
        for c in range(3):
            assert abs(int(np.median(images[0, c])) - expected[c]) <= 2


def test_prepare_is_deterministic_and_seeded(prepared: Path, tmp_path: Path) -> None:
    src = prepared / "imagenet"
    a = mini_imagenet.split_files(src, seed=0, per_class=(3, 1, 1))
    assert a == mini_imagenet.split_files(src, seed=0, per_class=(3, 1, 1))
    assert a != mini_imagenet.split_files(src, seed=1, per_class=(3, 1, 1))
    listed = (prepared / "data" / "mini-imagenet" / "train.txt").read_text().splitlines()
    assert [f"{p} {y}" for p, y in a["train"]] == listed


def test_load_mini_imagenet_lt_and_balanced(prepared: Path) -> None:
    root = prepared / "data"
    lt = load_dataset("mini-imagenet-lt", root, rho=3.0)
    expected = [int(3 * (1 / 3) ** (k / 99)) for k in range(100)]  # TailCalibX: int(), not round()
    assert lt.class_counts == expected and sum(expected) == len(lt.y_train)
    assert np.bincount(lt.y_train.numpy(), minlength=100).tolist() == expected
    assert lt.x_train.shape[1:] == (3, 8, 8) and len(lt.y_val) == 100 and len(lt.y_test) == 100
    assert (lt.many_threshold, lt.few_threshold) == (100, 20)
    # the long-tailed train images are the first n_k of each class in list order
    full = load_dataset("mini-imagenet", root)
    assert full.class_counts == [3] * 100
    for k in (0, 50, 99):
        first = full.x_train[full.y_train == k][: expected[k]]
        assert np.array_equal(lt.x_train[lt.y_train == k].numpy(), first.numpy())
    assert dataset_info("mini-imagenet-lt")["default_rho"] == 100


@pytest.mark.parametrize("load", [load_dataset, check_dataset], ids=["load", "check"])
def test_rho_too_large_for_the_prepared_counts(prepared: Path, load) -> None:
    with pytest.raises(WbsweepError, match="no training images"):
        load("mini-imagenet-lt", prepared / "data", rho=100.0)  # int(3 * 0.01) = 0


def test_the_drivers_check_passes_without_loading_the_images(prepared: Path, monkeypatch) -> None:
    import trainables.data as data

    monkeypatch.setattr(data, "_tensor", lambda a: pytest.fail("the check materialised the images"))
    check_dataset("mini-imagenet-lt", prepared / "data", rho=3.0)


@pytest.mark.parametrize("load", [load_dataset, check_dataset], ids=["load", "check"])
def test_missing_dataset_says_which_files_where_and_how(tmp_path: Path, load) -> None:
    with pytest.raises(WbsweepError) as err:
        load("mini-imagenet-lt", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "mini-imagenet") in msg and "images-train.npy" in msg and "train.txt" in msg
    assert "wbsweep data prepare mini-imagenet --imagenet-root" in msg


def test_too_few_images_per_class(tmp_path: Path) -> None:
    make_fake_imagenet(tmp_path / "imagenet", per_synset=2, extra=0)
    with pytest.raises(WbsweepError, match="has 2 images, mini-ImageNet needs 5"):
        mini_imagenet.split_files(tmp_path / "imagenet", per_class=(3, 1, 1))
    with pytest.raises(WbsweepError, match="synset folder"):
        mini_imagenet.split_files(tmp_path)


def test_cli_prepare(tmp_path: Path) -> None:
    make_fake_imagenet(tmp_path / "imagenet", per_synset=3, extra=0)
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "data", "prepare", "mini-imagenet",
                           "--imagenet-root", str(tmp_path / "imagenet" / "train"), "--out", str(out),
                           "--size", "8", "--per-class", "1,1,1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mini-imagenet" in proc.stdout and (out / "split.json").exists()
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "data", "prepare", "mini-imagenet",
                          "--imagenet-root", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a folder" in bad.stderr and "Traceback" not in bad.stderr
