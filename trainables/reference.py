"""The naive trainer: the benchmark's baseline and the fast trainer's oracle.

Written the way the paper's code (and most research code) is: a torchvision-style ``Dataset`` that
turns each uint8 image into a PIL image and runs per-sample transforms (``RandomCrop(32,
padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)``), a torch
``DataLoader``, float32, PyTorch's default SGD, and ``loss.item()`` after every step.

The science is the same as trainables/train.py's: the same model, loss (+ FR), parameter groups
with coupled weight decay, momentum and cosine schedule. Only how the work is scheduled differs,
which is what ``wbsweep bench`` times and what tests/test_speed.py checks: from the same
initialisation and the same batches, one epoch of each gives the same weights to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from trainables.data import LTDataset
from trainables.errors import WbsweepError
from trainables.losses import feature_regularisation
from trainables.models import Network, fix_batchnorm_, weight_decay_groups
from trainables.train import make_loss


class ImageArrayDataset(Dataset):
    """Like ``torchvision.datasets.CIFAR10``: the images as one (N, H, W, C) uint8 array (MNIST-like
    single-channel images as (N, H, W)); item i is ``transform(PIL image), label``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any = None):
        arr = images.cpu().numpy()
        self.data = arr[:, 0] if arr.shape[1] == 1 else np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
        self.targets = labels.cpu().numpy().astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


def reference_transform(data: LTDataset, augment: bool = True) -> T.Compose:
    """The authors' training transform: RandomCrop(size, padding=4) + RandomHorizontalFlip for CIFAR,
    RandomResizedCrop + RandomHorizontalFlip for mini-ImageNet, nothing for MNIST-like data, then
    ToTensor + Normalize."""
    steps: list[Any] = []
    if augment and data.augment == "crop_flip":
        steps += [T.RandomCrop(data.x_train.shape[-1], padding=4), T.RandomHorizontalFlip()]
    elif data.augment == "resized_crop_flip":  # mini-ImageNet's stored train squares (trainables/augment.py)
        size = data.x_val.shape[-1]
        steps += [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment else [T.CenterCrop(size)]
    steps += [T.ToTensor(), T.Normalize(data.mean, data.std)]
    return T.Compose(steps)


class ReferenceTrainer:
    """Stage-1 training of ``model`` on ``data`` as a typical research script does it.

    ``cfg`` is a resolved training config (trainables/config.py); the model must be built (and
    initialised) by the caller, so that both trainers can start from the same weights."""

    def __init__(self, cfg: dict[str, Any], data: LTDataset, model: Network, device: torch.device | str,
                 num_workers: int = 0, augment: bool = True, seed: int = 0):
        if cfg["stage2"]:
            raise WbsweepError("the reference trainer only does stage-1 training.")
        self.cfg, self.data, self.model = cfg, data, model
        self.device = torch.device(device)
        self.num_workers = num_workers
        if cfg["bn"] == "fixed":
            fix_batchnorm_(model, cfg["bn_scale"])
        groups = weight_decay_groups(model, cfg["wd"], cfg["wd_scope"], cfg["conv_only_linear"])
        self.optimizer = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg["epochs"], eta_min=0.0)
        self.criterion = make_loss(cfg, cfg["loss"], data.class_counts, self.device)
        self.dataset = ImageArrayDataset(data.x_train, data.y_train, reference_transform(data, augment))
        self.generator = torch.Generator().manual_seed(seed)

    def loader(self, order: torch.Tensor | None = None) -> DataLoader:
        """A shuffling DataLoader, or one that follows ``order`` (indices into the training set)."""
        bs = self.cfg["batch_size"]
        if order is not None:
            return DataLoader(self.dataset, batch_size=bs, sampler=order.tolist(), num_workers=self.num_workers)
        # A last batch of one would break train-mode BatchNorm: drop it (the fast trainer leaves
        # that image out of the epoch).
        drop_last = len(self.dataset) % bs == 1
        return DataLoader(self.dataset, batch_size=bs, shuffle=True, num_workers=self.num_workers,
                          drop_last=drop_last, generator=self.generator)

    def epoch(self, order: torch.Tensor | None = None) -> tuple[float, int]:
        """One epoch; returns (mean training loss, images seen)."""
        model, device, fr = self.model, self.device, self.cfg["fr"]
        model.train()
        running_loss, seen = 0.0, 0
        for images, labels in self.loader(order):
            images, labels = images.to(device), labels.to(device)
            features = model.backbone(images)
            logits = model.classifier(features)
            loss = self.criterion(features, logits, labels, model)
            if fr > 0:
                loss = loss + feature_regularisation(features, fr)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            running_loss += loss.item() * images.size(0)
            seen += images.size(0)
        self.scheduler.step()
        return running_loss / max(seen, 1), seen
