"""The training data on the device: a dataset's splits as uint8 tensors on the training device,
augmented and normalised there with batched tensor ops (no DataLoader, no per-sample transforms).

:class:`DeviceData` holds the splits and prepares a batch (augment, normalise); :func:`crop_flip` is
the CIFAR augmentation (torchvision's RandomCrop(padding=4) + RandomHorizontalFlip, for a whole
batch in one gather); :func:`chunk_images` is how many training images are prepared at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.augment import device_transform
from trainables.data import LTDataset


def draw_crop_flip(b: int, pad: int, generator: torch.Generator | None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image crop offsets (top ``oy``, left ``ox``, each uniform over 0..2*pad) and flips (p = 1/2),
    drawn on ``device`` in this order from ``generator``."""
    oy = torch.randint(0, 2 * pad + 1, (b,), device=device, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=device, generator=generator)
    flip = torch.rand(b, device=device, generator=generator) < 0.5
    return oy, ox, flip


def crop_flip_at(x: torch.Tensor, pad: int, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Image i of the uint8 batch ``x`` (B, C, H, W), zero-padded by ``pad``, cropped back to H x W at
    row ``oy[i]``, column ``ox[i]`` of the padded image, then mirrored left-right where ``flip[i]``:
    torchvision's ``hflip(crop(pad(img, pad), oy, ox, H, W))``, for the whole batch in one gather."""
    b, c, h, w = x.shape
    dev = x.device
    wp = w + 2 * pad
    padded = F.pad(x, (pad, pad, pad, pad)).reshape(b, c, -1)
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + ox[:, None]  # (B, W): source column
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H): source row
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.gather(2, index).reshape(b, c, h, w)


def crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Zero-padded random crop + horizontal flip of a uint8 batch (B, C, H, W), per image.

    The same distribution as torchvision's RandomCrop(H, padding=pad) + RandomHorizontalFlip():
    offsets uniform over 0..2*pad in each axis, flip with probability 1/2, zero padding before
    normalisation (as torchvision pads the raw image)."""
    return crop_flip_at(x, pad, *draw_crop_flip(x.shape[0], pad, generator, x.device))


class DeviceData:
    """The dataset's splits as uint8 tensors on ``device`` plus normalisation and augmentation."""

    def __init__(self, data: LTDataset, device: torch.device, augment: str = "auto"):
        """``augment``: the training option (``auto`` = the dataset's own augmentation)."""
        self.data = data
        self.device = device
        self.x = {s: getattr(data, f"x_{s}").to(device) for s in ("train", "val", "test")}
        self.y = {s: getattr(data, f"y_{s}").to(device) for s in ("train", "val", "test")}
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.augment = data.augment if augment == "auto" else augment
        self.crop = self.augment == "crop_flip"
        # mini-ImageNet's training images are stored larger than the model's input (the 256-px centre
        # square): RandomResizedCrop + flip when augmenting, else CenterCrop (trainables/augment.py)
        self.size = data.x_val.shape[-1]
        self.resized_crop = self.augment == "resized_crop_flip"

    def normalise(self, x_u8: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """(x / 255 - mean) / std in float32: the same operations, in the same order, as torchvision's
        ToTensor + Normalize, so the values are bit-identical to the reference trainer's."""
        if channels_last:
            x_u8 = x_u8.contiguous(memory_format=torch.channels_last)  # elementwise ops keep the layout
        return (x_u8.float() / 255.0 - self.mean) / self.std

    def prepare(self, x_u8: torch.Tensor, augment: bool, generator: torch.Generator | None,
                channels_last: bool = False) -> torch.Tensor:
        if self.resized_crop or x_u8.shape[-1] != self.size:
            x_u8 = device_transform(x_u8, self.size, augment and self.resized_crop, generator)
        elif augment and self.crop:
            x_u8 = crop_flip(x_u8, 4, generator)
        return self.normalise(x_u8, channels_last)


def chunk_images(dd: DeviceData, batch_size: int) -> int:
    """Training images prepared (gathered, augmented, normalised) at a time: whole batches of float
    images, few ops per epoch, bounded memory (256 MB on a GPU, 32 MB on a CPU). The augmentation is
    drawn per chunk, so a trainer that wants another's exact draws uses the same chunks."""
    budget = (256 if dd.device.type == "cuda" else 32) * 2**20
    image_bytes = 4 * max(1, dd.x["train"][0].numel())
    return max(1, budget // (image_bytes * batch_size)) * batch_size
