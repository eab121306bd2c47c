"""mini-ImageNet(-LT) prepared from a tiny fake ImageNet training folder that the test writes: the
100 standard synsets, a few JPEG/PNG files each, of assorted sizes and modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import wbsweep
from PIL import Image

from trainables import mini_imagenet
from trainables.data import check_dataset, dataset_info, load_dataset
from trainables.errors import WbsweepError

PER_SYNSET = 5


def make_fake_imagenet(root: Path, per_synset: int = PER_SYNSET, extra: int = 2) -> Path:
    """ImageNet's train layout: root/<synset>/<synset>_<n>.JPEG, plus a few non-mini synsets, a
    stray file and macOS's hidden companions (AppleDouble ``._<name>.JPEG``, not JPEGs, and
    ``.DS_Store``), which must never be counted, drawn or decoded. The colour of each image encodes
    (class rank, file number) so the test can check which file ended where."""
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
        (folder / f"._{s}_1.JPEG").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
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
    assert info["counts"] == {"train": 300, "val": 100, "test": 100} and (info["size"], info["resize"]) == (8, 9)
    assert info["format"] == mini_imagenet.FORMAT
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
    assert images.shape == (300, 3, 9, 9) and images.dtype == np.uint8  # train: the Resize side, a square
    assert np.load(folder / "images-val.npy").shape == (100, 3, 8, 8)
    # the first listed train image: uniform colour (rank, 10 n, 7) -> every pixel of the 9x9 square
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
    assert lt.x_train.shape[1:] == (3, 9, 9) and lt.x_val.shape[1:] == (3, 8, 8) and len(lt.y_val) == 100
    assert lt.augment == "resized_crop_flip" and len(lt.y_test) == 100
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
    import trainables.list_split as data

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
    proc = wbsweep("data", "prepare", "mini-imagenet", "--imagenet-root", str(tmp_path / "imagenet" / "train"),
                   "--out", str(out), "--size", "8", "--resize", "10", "--per-class", "1,1,1", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert np.load(out / "images-train.npy").shape == (100, 3, 10, 10)
    assert np.load(out / "images-test.npy").shape == (100, 3, 8, 8)
    assert "mini-imagenet" in proc.stdout and (out / "split.json").exists()
    bad = wbsweep("data", "prepare", "mini-imagenet", "--imagenet-root", str(tmp_path / "nope"), timeout=300)
    assert bad.returncode == 2 and "not a folder" in bad.stderr and "Traceback" not in bad.stderr


def test_prepared_images_are_the_authors_transforms(prepared: Path) -> None:
    """val/test are torchvision's Resize(R) + CenterCrop(S) of the PIL image (the authors' evaluation
    transform), train is Resize(R) + CenterCrop(R) (the square RandomResizedCrop is drawn on); an
    un-augmented train image on the device is exactly the evaluation transform of its file."""
    import torch
    from torchvision.transforms import functional as TF

    from trainables.data import LTDataset
    from trainables.device_data import DeviceData

    folder = prepared / "data" / "mini-imagenet"
    src = prepared / "imagenet" / "train"

    def authors(path: str, crop: int) -> np.ndarray:
        with Image.open(src / path) as im:
            return np.asarray(TF.center_crop(TF.resize(im.convert("RGB"), [9]), [crop, crop])).transpose(2, 0, 1)

    for split, side in (("train", 9), ("val", 8), ("test", 8)):
        images = np.load(folder / f"images-{split}.npy")
        paths = [ln.split()[0] for ln in (folder / f"{split}.txt").read_text().splitlines()]
        for i in range(0, len(paths), 37):
            assert np.array_equal(images[i], authors(paths[i], side)), (split, paths[i])
    data = load_dataset("mini-imagenet", prepared / "data")
    assert isinstance(data, LTDataset)
    dd = DeviceData(data, torch.device("cpu"))
    paths = [ln.split()[0] for ln in (folder / "train.txt").read_text().splitlines()]
    plain = dd.prepare(dd.x["train"][:40], False, None) * dd.std + dd.mean  # back to [0, 1]
    for i in range(0, 40, 7):
        assert torch.allclose(plain[i] * 255, torch.from_numpy(authors(paths[i], 8).copy()).float(), atol=1e-3)
    gen = torch.Generator().manual_seed(3)
    aug = dd.prepare(dd.x["train"][:40], True, gen)
    assert aug.shape == (40, 3, 8, 8)
    from trainables.augment import resized_crop_flip

    want = dd.normalise(resized_crop_flip(dd.x["train"][:40], 8, torch.Generator().manual_seed(3)))
    assert torch.equal(aug, want)
    assert torch.equal(dd.prepare(dd.x["val"], False, None), dd.normalise(dd.x["val"]))  # val: as stored


def test_hidden_files_are_skipped(tmp_path: Path) -> None:
    make_fake_imagenet(tmp_path / "imagenet", per_synset=2, extra=0)  # 2 images + 2 hidden files per synset
    with pytest.raises(WbsweepError, match="has 2 images, mini-ImageNet needs 3"):
        mini_imagenet.split_files(tmp_path / "imagenet", per_class=(1, 1, 1))
    lists = mini_imagenet.split_files(tmp_path / "imagenet", per_class=(1, 1, 0))
    names = [p.rsplit("/", 1)[1] for split in lists.values() for p, _ in split]
    assert len(names) == 200 and not any(n.startswith(".") for n in names)


@pytest.mark.parametrize("load", [load_dataset, check_dataset], ids=["load", "check"])
def test_old_prepared_folder_is_refused(prepared: Path, tmp_path: Path, load) -> None:
    import shutil

    old = tmp_path / "data" / "mini-imagenet"
    shutil.copytree(prepared / "data" / "mini-imagenet", old)
    info = json.loads((old / "split.json").read_text())
    for key in ("format", "resize", "train", "eval"):  # what an older wbsweep wrote
        info.pop(key)
    (old / "split.json").write_text(json.dumps(info))
    with pytest.raises(WbsweepError) as err:
        load("mini-imagenet-lt", tmp_path / "data", rho=3.0)
    msg = str(err.value)
    assert "\n" not in msg and "older wbsweep" in msg and "wbsweep data prepare mini-imagenet" in msg
    assert str(old) in msg


def test_trains_end_to_end_on_the_new_format(prepared: Path, tmp_path: Path) -> None:
    """The trainer takes 9-px train squares and 8-px val/test: the model is built for the crop side
    (an MLP's input is 3 * 8 * 8, which would fail at 9 px), training crops to 8 on the device."""
    import torch

    from trainables.train import train

    n = torch.get_num_threads()
    try:
        metrics = train({"dataset": "mini-imagenet", "data_root": str(prepared / "data"), "model": "mlp3",
                         "width": 16, "epochs": 1, "threads": 1, "device": "cpu", "la": ["none"], "seed": 0},
                        tmp_path)
    finally:
        torch.set_num_threads(n)
    assert 0.0 <= metrics["la"]["none"]["avg"] <= 100.0 and (tmp_path / "metrics.json").is_file()
    # the stored model takes 8-px inputs: its first linear layer has 3 * 8 * 8 inputs
    state = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    assert any(getattr(v, "ndim", 0) == 2 and v.shape[1] == 3 * 8 * 8 for v in state.values())
