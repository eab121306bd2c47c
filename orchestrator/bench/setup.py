"""What every ``wbsweep bench`` section runs with: synthetic data of the real shapes, the training
config, and the device and machine it reports.

The data: random uint8 pixels with the long-tailed label profile of CIFAR100-LT (3x32x32, 100
classes, rho 100: 10,457 training and 2,000 validation images) for convolutional models, MNIST-LT
(1x28x28, 10 classes, rho 100) for MLPs. Random pixels train at the same speed as real ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from trainables.config import resolve_config
from trainables.data import LTDataset, lt_counts
from trainables.models import check_model_name
from trainables.train import pick_device

Log = Callable[[str], None]

# --- synthetic data of the real shapes -------------------------------------------------------------

SHAPES: dict[str, dict[str, Any]] = {
    "cifar": {"title": "CIFAR100-LT-shaped", "classes": 100, "image": (3, 32, 32), "n_max": 480, "rho": 100.0,
              "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010), "augment": "crop_flip",
              "many": 100, "few": 20},
    "mnist": {"title": "MNIST-LT-shaped", "classes": 10, "image": (1, 28, 28), "n_max": 5980, "rho": 100.0,
              "mean": (0.1307,), "std": (0.3081,), "augment": "none", "many": 1000, "few": 200},
}


def data_kind(model: str) -> str:
    """cifar for the convolutional models, mnist for the MLPs."""
    return "mnist" if model.startswith(("mlp", "resblock")) else "cifar"


def synthetic_dataset(kind: str, train_images: int | None = None, val_per_class: int = 20,
                      test_images: int = 1000, seed: int = 0) -> LTDataset:
    """Random uint8 images with the long-tailed label profile of ``kind`` (SHAPES), labels in a
    random file order. ``train_images`` scales the profile down to about that many images (every
    class keeps at least one)."""
    s = SHAPES[kind]
    gen = torch.Generator().manual_seed(seed)
    c = s["classes"]
    counts = lt_counts(s["n_max"], c, s["rho"])
    if train_images is not None and train_images < sum(counts):
        scale = train_images / sum(counts)
        counts = [max(1, round(n * scale)) for n in counts]
    y = torch.repeat_interleave(torch.arange(c), torch.tensor(counts))
    y = y[torch.randperm(len(y), generator=gen)]

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, *s["image"]), dtype=torch.uint8, generator=gen)

    y_val = torch.arange(c).repeat_interleave(val_per_class)
    y_test = torch.arange(test_images) % c
    return LTDataset(
        name=f"synthetic-{kind}-lt", x_train=images(len(y)), y_train=y, x_val=images(len(y_val)), y_val=y_val,
        x_test=images(test_images), y_test=y_test, num_classes=c, class_counts=counts, mean=s["mean"],
        std=s["std"], augment=s["augment"], many_threshold=s["many"], few_threshold=s["few"],
    )


def default_images(device: torch.device, model: str) -> int | None:
    """Training images per epoch: the whole synthetic set on a GPU; on a CPU a subset that keeps an
    epoch to a few seconds (all that matters is images per second)."""
    if device.type == "cuda":
        return None
    if model == "resnet32":
        return 640
    return 4096 if data_kind(model) == "mnist" else 256


def bench_config(model: str, device: str, batch_size: int = 64, width: int | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training config both trainers use: the paper's optimisation (SGD momentum 0.9, lr 0.01,
    cosine over 320 epochs, batch 64) with weight decay 5e-3 and CE (the WD method)."""
    check_model_name(model)
    base = {"model": model, "width": width, "batch_size": batch_size, "epochs": 320, "lr": 0.01, "momentum": 0.9,
            "wd": 5e-3, "loss": "ce", "device": device, "la": ["none"], "seed": 0, "checkpoint_seconds": 1e9}
    return resolve_config({**base, **(overrides or {})})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or ``taskset``'s share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages: other work on the cores moves CPU figures."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _setup(device: str, threads: int | None) -> torch.device:
    dev = pick_device(device)
    if threads:
        torch.set_num_threads(int(threads))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both trainers: fixed shapes
    return dev
