"""mini-ImageNet and mini-ImageNet-LT, built from the user's ImageNet training images.

Nothing can be downloaded here (and ImageNet's licence requires the user to fetch it), so the
dataset is *prepared* once from an ImageNet training folder (one sub-folder per synset, as
``ILSVRC2012_img_train.tar`` unpacks)::

    wbsweep data prepare mini-imagenet --imagenet-root /data/ILSVRC2012/train [--out DIR]

The procedure follows TailCalibX (Vigneswaran et al. 2021, the paper's reference for
mini-ImageNet-LT), made deterministic:

* the 100 classes are the standard mini-ImageNet classes (Vinyals et al. 2016 with the split of
  Ravi & Larochelle 2017: 64 + 16 + 20 synsets, listed in :data:`SYNSETS`); label k is the k-th
  synset in sorted order (TailCalibX maps labels with ``np.unique``, which sorts);
* per class, its ImageNet training files in sorted name order are shuffled with a seeded
  ``numpy.random.default_rng(seed)`` (one generator, classes in label order), and the first 500
  become train, the next 100 validation, the next 100 test (TailCalibX: 500/100/100 drawn at
  random, unseeded);
* mini-ImageNet-LT keeps the first n_k = int(500 * (1/rho) ** (k / 99)) train images of class k
  (TailCalibX's ``get_img_num_per_cls``, int() truncation; rho = 100 gives 500, 476, ..., 5);
  validation and test stay balanced. This cut is made when loading, so rho is a training option.

The prepared folder holds the lists (``train.txt``, ``val.txt``, ``test.txt``: "synset/file label"
per line, paths relative to the ImageNet folder, TailCalibX's format), ``classes.txt`` and the
decoded images as uint8 arrays (``images-<split>.npy``, rows in list order) so that a trial loads
them in seconds. They hold what the authors' transforms need (torchvision's ImageNet recipe, as in
their ``utils/data_units.py``), for crop side S = 224 and resize side R = 256 (``--size``,
``--resize``; R defaults to round(S * 256 / 224)):

* validation and test: ``Resize(R)`` + ``CenterCrop(S)`` applied by torchvision to the PIL image,
  (N, 3, S, S): exactly the authors' evaluation transform;
* train: ``Resize(R)`` + ``CenterCrop(R)``, (N, 3, R, R): the shorter side resized to R and the
  centre R x R square kept. The trainer draws ``RandomResizedCrop(S)`` + flip on that square on the
  device (trainables/augment.py). The authors draw the box on the whole original image; the
  approximation is (1) the box is drawn on the centre square (for a 4:3 photo, 3/4 of the image:
  the side strips are never seen and every box covers 4/3 times the fraction of the square that
  it would of the photo), and (2) the box is cut from the image at shorter side R instead of the
  original resolution (ImageNet's are ~400 px), so boxes under S px are upsampled from fewer
  pixels (blurrier). An un-augmented training image is centre-cropped to S, which is exactly the
  evaluation transform (see trainables/augment.py).

Storage: train 3 * 256^2 = 196,608 bytes per image (50,000 prepared: 9.8 GB on disk; at rho = 100
the 10,847 kept train images take 2.1 GB on the device), validation and test 150,528 bytes (3.0 GB
for the 20,000). ``split.json`` records the format (:data:`FORMAT`); a folder prepared by an older
wbsweep (every split as 224-px centre crops) is refused with a request to prepare it again.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from trainables.errors import WbsweepError

#: The 100 synsets of mini-ImageNet (Ravi & Larochelle's train, val and test classes), in the
#: order of TailCalibX's ``mini_keys``; labels follow the sorted order (:func:`classes`).
SYNSETS = (
    "n02110341", "n01930112", "n04509417", "n04067472", "n04515003", "n02120079", "n03924679", "n02687172",
    "n03075370", "n07747607", "n09246464", "n02457408", "n04418357", "n03535780", "n04435653", "n03207743",
    "n04251144", "n03062245", "n02174001", "n07613480", "n03998194", "n02074367", "n04146614", "n04243546",
    "n03854065", "n03838899", "n02871525", "n03544143", "n02108089", "n13133613", "n03676483", "n03337140",
    "n03272010", "n01770081", "n09256479", "n02091244", "n02116738", "n04275548", "n03773504", "n02606052",
    "n03146219", "n04149813", "n07697537", "n02823428", "n02089867", "n03017168", "n01704323", "n01532829",
    "n03047690", "n03775546", "n01843383", "n02971356", "n13054560", "n02108551", "n02101006", "n03417042",
    "n04612504", "n01558993", "n04522168", "n02795169", "n06794110", "n01855672", "n04258138", "n02110063",
    "n07584110", "n02091831", "n03584254", "n03888605", "n02113712", "n03980874", "n02219486", "n02138441",
    "n02165456", "n02108915", "n03770439", "n01981276", "n03220513", "n02099601", "n02747177", "n01749939",
    "n03476684", "n02105505", "n02950826", "n04389033", "n03347037", "n02966193", "n03127925", "n03400231",
    "n04296562", "n03527444", "n04443257", "n02443484", "n02114548", "n04604644", "n01910747", "n04596742",
    "n02111277", "n03908618", "n02129165", "n02981792",
)
SPLITS = ("train", "val", "test")
PER_CLASS = (500, 100, 100)  # train, val, test images per class before the long-tailed cut
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
#: Version of the prepared folder's layout, in split.json: 2 = train squares at R, val/test at S.
#: Folders without it hold 224-px centre crops for every split (the CIFAR-style protocol).
FORMAT = 2
FOLDER = "mini-imagenet"  # under the data root
FILES = ("classes.txt", *(f"{s}.txt" for s in SPLITS), *(f"images-{s}.npy" for s in SPLITS), "split.json")
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as torchvision's ImageNet models
STD = (0.229, 0.224, 0.225)


def classes() -> list[str]:
    """Synset of each label: label k is the k-th synset in sorted order."""
    return sorted(SYNSETS)


def how_to_prepare(folder: Path) -> str:
    return (f"build them from ImageNet's training images with `wbsweep data prepare mini-imagenet "
            f"--imagenet-root /path/to/ILSVRC2012/train --out {folder}` (ImageNet from https://image-net.org: "
            f"the root holds one folder per synset, e.g. n01532829/), or pass --data-root pointing at the "
            f"folder that contains {FOLDER}/")


def lt_counts_int(n_max: int, num_classes: int, rho: float) -> list[int]:
    """TailCalibX's exponential profile: int(n_max * (1/rho) ** (k / (C - 1))), truncated."""
    if num_classes == 1:
        return [n_max]
    return [int(n_max * (1.0 / rho) ** (k / (num_classes - 1.0))) for k in range(num_classes)]


def _imagenet_train_dir(root: Path) -> Path:
    """The folder with one sub-folder per synset: ``root`` itself or ``root/train``."""
    probe = sorted(SYNSETS)[0]
    for cand in (root, root / "train"):
        if (cand / probe).is_dir():
            return cand
    raise WbsweepError(f"--imagenet-root {root} has no synset folder {probe}/ (nor train/{probe}/); point it at "
                       "ImageNet's training folder, which holds one folder per synset (ILSVRC2012_img_train)")


def _is_image(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def split_files(imagenet_root: Path, seed: int = 0, per_class: tuple[int, int, int] = PER_CLASS
                ) -> dict[str, list[tuple[str, int]]]:
    """(relative path, label) per split, drawn as the module docstring says. Hidden entries (names
    starting with ".": macOS's AppleDouble ``._n01532829_1.JPEG`` companions, ``.DS_Store``) are
    not images and are skipped before counting and drawing."""
    base = _imagenet_train_dir(imagenet_root)
    rng = np.random.default_rng(seed)
    need = sum(per_class)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label, synset in enumerate(classes()):
        folder = base / synset
        files = sorted(p.name for p in folder.iterdir() if _is_image(p)) if folder.is_dir() else []
        if len(files) < need:
            raise WbsweepError(f"{folder} has {len(files)} images, mini-ImageNet needs {need} per class "
                               f"({'/'.join(map(str, per_class))} train/val/test); is this ImageNet's training folder?")
        order = rng.permutation(len(files))
        start = 0
        for split, n in zip(SPLITS, per_class, strict=True):
            out[split] += [(f"{synset}/{files[i]}", label) for i in order[start:start + n]]
            start += n
    return out


def default_resize(size: int) -> int:
    """The Resize side for a crop side: round(size * 256 / 224) (torchvision's ImageNet recipe)."""
    return round(size * 256 / 224)


def load_image(path: Path, resize: int, crop: int) -> np.ndarray:
    """RGB uint8 (3, crop, crop): torchvision's ``Resize(resize)`` (shorter side to ``resize``,
    bilinear with Pillow's antialiasing, the other side int()-truncated as torchvision computes it)
    then ``CenterCrop(crop)``, on the PIL image as the authors' transforms run."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as im:
        im = TF.center_crop(TF.resize(im.convert("RGB"), [resize]), [crop, crop])
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def prepare(imagenet_root: str | Path, out: str | Path, size: int = 224, seed: int = 0,
            per_class: tuple[int, int, int] = PER_CLASS, workers: int | None = None,
            resize: int | None = None) -> dict:
    """Write the split lists and the decoded images into ``out``; returns what ``split.json`` says.

    ``size`` is the crop side S (the model's input), ``resize`` the Resize side R (default
    :func:`default_resize`): train images are stored at R x R, validation and test at S x S.

    Files are written under temporary names and renamed, ``split.json`` last, so an interrupted
    run never leaves a folder that looks prepared."""
    root, out = Path(imagenet_root).expanduser(), Path(out).expanduser()
    if not root.is_dir():
        raise WbsweepError(f"--imagenet-root {root} is not a folder.")
    if size < 8:
        raise WbsweepError(f"--size {size} is too small; use e.g. 224 (or 84, the few-shot mini-ImageNet size).")
    resize = default_resize(size) if resize is None else int(resize)
    if resize < size:
        raise WbsweepError(f"--resize {resize} is smaller than --size {size}; the crop is taken from the resized "
                           "image (the authors: --size 224 --resize 256).")
    lists = split_files(root, seed, per_class)
    base = _imagenet_train_dir(root)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WbsweepError(f"cannot create {out}: {exc.strerror}.") from None
    (out / "split.json").unlink(missing_ok=True)
    started = time.time()
    for split in SPLITS:
        entries = lists[split]
        side = resize if split == "train" else size  # train: the R x R square the random crop is drawn on
        tmp = out / f".images-{split}.npy.tmp"
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(entries), 3, side, side))

        def fill(i: int, arr=arr, entries=entries, side=side) -> None:
            try:
                arr[i] = load_image(base / entries[i][0], resize, side)
            except Exception as exc:  # a truncated JPEG etc.: name the file
                raise WbsweepError(f"cannot decode {base / entries[i][0]}: {exc}") from None

        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(len(entries))))
        arr.flush()
        del arr
        os.replace(tmp, out / f"images-{split}.npy")
        (out / f"{split}.txt").write_text("".join(f"{p} {y}\n" for p, y in entries))
    (out / "classes.txt").write_text("".join(f"{s}\n" for s in classes()))
    info = {"format": FORMAT, "imagenet_root": str(root.resolve()), "size": size, "resize": resize,
            "train": f"Resize({resize}) + CenterCrop({resize}); RandomResizedCrop({size}) + flip on the device",
            "eval": f"Resize({resize}) + CenterCrop({size})", "seed": seed, "per_class": list(per_class),
            "num_classes": len(SYNSETS), "counts": {s: len(lists[s]) for s in SPLITS},
            "seconds": round(time.time() - started, 1), "procedure": "TailCalibX, seeded (trainables/mini_imagenet.py)"}
    tmp = out / ".split.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out / "split.json")
    return info


def read_prepared(folder: Path, key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(images as a read-only memory map, labels) per split from a prepared folder."""
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise WbsweepError(f"{key}: missing {', '.join(missing)} in {folder} (expected {', '.join(FILES)}); "
                           + how_to_prepare(folder))
    try:
        info = json.loads((folder / "split.json").read_text())
        fmt, size, resize = info.get("format"), int(info["size"]), int(info.get("resize", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        fmt = size = resize = None
    if fmt != FORMAT:
        raise WbsweepError(f"{key}: {folder} was prepared by an older wbsweep (every split as centre crops; the "
                           f"authors' RandomResizedCrop needs the larger train images): run `wbsweep data prepare "
                           f"mini-imagenet --imagenet-root /path/to/ILSVRC2012/train --out {folder}` again.")
    out = {}
    for split in SPLITS:
        side = resize if split == "train" else size
        labels = []
        for n, line in enumerate((folder / f"{split}.txt").read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) < 2 or not parts[-1].isdigit() or int(parts[-1]) >= len(SYNSETS):
                raise WbsweepError(f"{folder / f'{split}.txt'}:{n} is not 'path label'; prepare the folder again.")
            labels.append(int(parts[-1]))
        try:
            images = np.load(folder / f"images-{split}.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise WbsweepError(f"{folder / f'images-{split}.npy'} is unreadable ({exc}); prepare the folder "
                               "again.") from None
        if images.shape != (len(labels), 3, side, side) or images.dtype != np.uint8:
            raise WbsweepError(f"{folder / f'images-{split}.npy'} holds {images.dtype}{list(images.shape)} for "
                               f"{len(labels)} listed images of {side} px (split.json); prepare the folder again.")
        out[split] = (images, np.asarray(labels, dtype=np.int64))
    return out
