"""GPU check of the parts of the paper specs that only a GPU exercises at their real sizes:
mini-ImageNet-LT prepared at 224 px and trained with ResNet34's ImageNet stem (Table 9, Figure 5),
ResNeXt50 on a CIFAR-100-shaped set (Table 10), MLP5 on an MNIST-shaped set (Figure 2), and every
analysis computed on the GPU from the checkpoints. Pixels are random, so accuracies mean nothing;
shapes, the data path and the timings are real. Needs torch, torchvision, scikit-learn, pillow and
matplotlib only (no Ray, Optuna or MLflow):

    PYTHONPATH=. python bench/gpu_paper_check.py OUT [--device cuda] [--small]

``--small`` shrinks everything for a CPU dry run. Writes OUT/gpu_paper_check.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fake_cifar import write as write_cifar  # noqa: E402
from trainables import mini_imagenet  # noqa: E402
from trainables.analysis import run_analyses  # noqa: E402
from trainables.train import train  # noqa: E402

FIGURE_ANALYSES = ["fdr_random_layer", "class_cosine", "feature_norms", "weight_norms", "relu_fdr"]


def fake_imagenet(root: Path, per: int, small: bool) -> Path:
    rng = np.random.default_rng(0)
    for s in mini_imagenet.SYNSETS:
        folder = root / "train" / s
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per):
            h, w = (40, 48) if small else (300 + n, 256 + 3 * n)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{s}_{n}.JPEG")
    return root / "train"


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1))


def fake_mnist(root: Path, per_train: int, per_test: int) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for stem, per in (("train", per_train), ("t10k", per_test)):
        y = rng.permutation(np.repeat(np.arange(10), per))
        x = rng.integers(0, 256, (len(y), 28, 28), dtype=np.uint8)
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", y)
    return root


def step(report: dict, name: str, cfg: dict, out: Path, device: str, analyses: list[str]) -> None:
    t0 = time.time()
    metrics = train({**cfg, "device": device, "la": ["none", "mult"]}, out / name)
    t1 = time.time()
    result = run_analyses(out / name, analyses, device=device)
    t2 = time.time()
    report[name] = {
        "train_seconds": round(metrics["train_seconds"], 2), "seconds_per_epoch": round(metrics["train_seconds"]
                                                                                          / metrics["epochs"], 2),
        "wall_train": round(t1 - t0, 2), "analyses_seconds": round(t2 - t1, 2), "fdr_test": metrics["fdr_test"],
        "acc_avg": metrics["la"]["none"]["avg"], "analyses": sorted(result["analyses"]), "skipped": result["skipped"],
        "device": metrics["device"],
    }
    print(name, json.dumps(report[name]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true")
    args = p.parse_args()
    out, small, dev = args.out, args.small, args.device
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

    # Table 9 / Figure 5: mini-ImageNet-LT from an ImageNet-shaped folder at 224 px, ImageNet stem
    t0 = time.time()
    src = fake_imagenet(out / "imagenet", 8, small)
    size = 32 if small else 224
    info = mini_imagenet.prepare(src, out / "data" / "mini-imagenet", size=size, per_class=(4, 2, 2))
    report["prepare"] = {"seconds": round(time.time() - t0, 1), **info["counts"], "size": size}
    print("prepare", report["prepare"], flush=True)
    base = {"data_root": str(out / "data"), "epochs": 2, "batch_size": 64, "lr": 0.01, "seed": 0,
            "checkpoint_seconds": 0, "track_forgetting": True}
    step(report, "mini_imagenet_lt_resnet34", {**base, "dataset": "mini-imagenet-lt", "rho": 4.0, "model": "resnet34",
                                               "width": 8 if small else None, "wd": 3e-3, "eval_batch_size": 256},
         out, dev, [*FIGURE_ANALYSES, "forgetting"])

    # Table 10: ResNeXt50 on a CIFAR-100-shaped set (10,847 LT train images per epoch, as CIFAR100-LT)
    write_cifar(out / "data", 100)
    step(report, "cifar100_lt_resnext50", {**base, "dataset": "digits-lt" if small else "cifar100-lt",
                                           "model": "resnext50", "epochs": 1,
                                           "width": 16 if small else None, "wd": 5e-3, "eval_batch_size": 1024},
         out, dev, [a for a in FIGURE_ANALYSES if a != "relu_fdr"])  # relu_fdr is for the MLPs (figure 2)

    # Figure 2 / Table 3: MLP5 of width 1024 on an MNIST-shaped set (60,000 / 10,000 images)
    fake_mnist(out / "data", 600 if small else 6000, 100 if small else 1000)
    step(report, "mnist_mlp5", {**base, "dataset": "mnist", "model": "mlp5", "epochs": 1, "wd": 1e-2,
                                "width": 64 if small else None}, out, dev, FIGURE_ANALYSES)
    (out / "gpu_paper_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
