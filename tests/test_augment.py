"""The device-side RandomResizedCrop + flip (trainables/augment.py) against torchvision: the same
pixels at fixed boxes, the same box distribution as ``RandomResizedCrop.get_params``."""

from __future__ import annotations

import math

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2

from trainables.augment import (
    center_crop,
    device_transform,
    draw_resized_crop_flip,
    resized_crop_flip,
    resized_crop_flip_at,
    vertical_first,
)

PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13  # Pillow 13 runs some resizes vertical pass first


def _images(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(b, c, h, w), dtype=np.uint8))


def _pil_reference(img: torch.Tensor, top: int, left: int, h: int, w: int, flip: bool, size: int) -> torch.Tensor:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip at this box, on the PIL image (the
    authors' pipeline: their dataset yields PIL images)."""
    arr = img.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if img.shape[0] == 1 else arr)
    out = TF.resized_crop(pil, top, left, h, w, [size, size])
    if flip:
        out = TF.hflip(out)
    a = np.asarray(out)
    return torch.from_numpy((a[None] if img.shape[0] == 1 else a.transpose(2, 0, 1)).copy())


def _boxes(hs: int, ws: int, size: int) -> tuple[torch.Tensor, ...]:
    """Drawn boxes plus the edge cases: whole image, exactly size x size (no resampling), tiny,
    extreme ratios, corners, both pass orders, both flips."""
    top, left, h, w, _ = draw_resized_crop_flip(24, hs, ws, torch.Generator().manual_seed(5))
    fixed = [(0, 0, hs, ws), (hs - size, ws - size, size, size), (3, 5, 9, 12), (0, ws - 30, hs, 30),
             (hs - 20, 0, 20, ws), (1, 2, hs - 1, ws - 7), (7, 1, size + 1, size - 5), (2, 9, size - 9, size + 3)]
    f = torch.tensor(fixed)
    top, left, h, w = (torch.cat([a, f[:, i]]) for i, a in enumerate((top, left, h, w)))
    flip = torch.arange(len(top)) % 2 == 0
    return top, left, h, w, flip


@pytest.mark.parametrize("shape,size", [((3, 256, 256), 224), ((3, 40, 60), 24), ((1, 9, 9), 8)],
                         ids=["imagenet", "non-square", "grey-small"])
def test_resized_crop_flip_at_equals_torchvision_on_pil_at_fixed_boxes(shape: tuple[int, int, int], size: int) -> None:
    c, hs, ws = shape
    if min(hs, ws) < size + 9:  # the tiny test image: boxes drawn only
        top, left, h, w, _ = draw_resized_crop_flip(40, hs, ws, torch.Generator().manual_seed(1))
        flip = torch.arange(40) % 2 == 0
    else:
        top, left, h, w, flip = _boxes(hs, ws, size)
    x = _images(len(top), c, hs, ws)
    out = resized_crop_flip_at(x, top, left, h, w, flip, size)
    assert out.shape == (len(top), c, size, size) and out.dtype == torch.uint8
    vf = vertical_first(h, w, size)
    if hs > size:
        assert vf.any() and (~vf).any()  # both of Pillow's pass orders are exercised
    for i in range(len(top)):
        want = _pil_reference(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), bool(flip[i]), size)
        if PILLOW_13 or not vf[i]:
            assert torch.equal(out[i], want), (i, top[i], left[i], h[i], w[i])  # bit for bit
        else:  # Pillow <= 12 always resized horizontally first
            assert int((out[i].int() - want.int()).abs().max()) <= 1


def test_within_one_level_of_torchvision_tensor_kernels() -> None:
    """torchvision's own tensor paths (native uint8 on CPU; float32 + round, its GPU path) differ from
    Pillow by 1 level at some pixels; ours (= Pillow) stays within 1 of both, never more."""
    top, left, h, w, flip = _boxes(256, 256, 224)
    x = _images(len(top), 3, 256, 256, seed=2)
    out = resized_crop_flip_at(x, top, left, h, w, flip, 224).int()
    worst = {"uint8": 0, "float": 0}
    for i in range(len(top)):
        args = (int(top[i]), int(left[i]), int(h[i]), int(w[i]), [224, 224])
        u8 = TF2.resized_crop(x[i], *args, antialias=True)
        fl = TF2.resized_crop(x[i].float(), *args, antialias=True).round().clamp(0, 255)
        for name, ref in (("uint8", u8), ("float", fl)):
            ref = ref.flip(-1) if flip[i] else ref
            worst[name] = max(worst[name], int((out[i] - ref.int()).abs().max()))
    assert worst == {"uint8": 1, "float": 1}


def _torchvision_boxes(n: int, hs: int, ws: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    img = torch.zeros(1, hs, ws)
    return np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])


def _uniform_ratio_boxes(n: int, hs: int, ws: int, seed: int) -> np.ndarray:
    """A plausible wrong sampler: everything as get_params but the ratio uniform, not log-uniform."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        for _ in range(10):
            area = hs * ws * rng.uniform(0.08, 1.0)
            r = rng.uniform(3 / 4, 4 / 3)
            w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
            if 0 < w <= ws and 0 < h <= hs:
                out.append((rng.integers(0, hs - h + 1), rng.integers(0, ws - w + 1), h, w))
                break
        else:
            out.append(((hs - min(hs, ws)) // 2, (ws - min(hs, ws)) // 2, min(hs, ws), min(hs, ws)))
    return np.array(out)


def _stats(boxes: np.ndarray, hs: int, ws: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(np.float64)
    return {"area": h * w / (hs * ws), "ratio": w / h, "top": top, "left": left, "h": h}


@pytest.mark.parametrize("hs,ws", [(256, 256), (100, 300)], ids=["square", "wide"])
def test_boxes_are_drawn_with_torchvision_distribution(hs: int, ws: int) -> None:
    """Two-sample KS tests of area fraction, aspect ratio, top, left and height against
    RandomResizedCrop.get_params (8000 draws each, fixed seeds, so deterministic): every p > 1e-3,
    and the same test rejects a uniform-ratio sampler (p < 1e-6), so it has the power to see a
    wrong distribution. On the wide image (ratio 3 > 4/3) some draws fail 10 times and take the
    central fall-back; its frequency must agree within binomial noise."""
    n = 8000
    top, left, h, w, flip = draw_resized_crop_flip(n, hs, ws, torch.Generator().manual_seed(11))
    ours = _stats(torch.stack([top, left, h, w], 1).numpy(), hs, ws)
    ref_boxes = _torchvision_boxes(n, hs, ws, seed=12)
    ref = _stats(ref_boxes, hs, ws)
    for key in ours:
        p = ks_2samp(ours[key], ref[key]).pvalue
        assert p > 1e-3, (key, p)
    wrong = _stats(_uniform_ratio_boxes(n, hs, ws, seed=13), hs, ws)
    assert ks_2samp(wrong["ratio"], ref["ratio"]).pvalue < 1e-6
    assert ((top >= 0) & (left >= 0) & (top + h <= hs) & (left + w <= ws) & (h > 0) & (w > 0)).all()
    assert abs(flip.float().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(n)
    if hs != ws:
        fb = (0, (300 - 133) // 2, 100, 133)  # get_params' central fall-back for 100 x 300
        ours_fb = float(((top == fb[0]) & (left == fb[1]) & (h == fb[2]) & (w == fb[3])).float().mean())
        ref_fb = float((ref_boxes == np.array(fb)).all(1).mean())
        assert ref_fb > 0.002 and abs(ours_fb - ref_fb) < 4 * math.sqrt(2 * ref_fb / n)


def test_resized_crop_flip_is_draw_then_apply() -> None:
    x = _images(16, 3, 40, 40)
    out = resized_crop_flip(x, 32, torch.Generator().manual_seed(9))
    draws = draw_resized_crop_flip(16, 40, 40, torch.Generator().manual_seed(9))
    assert torch.equal(out, resized_crop_flip_at(x, *draws, 32))
    assert not torch.equal(out, resized_crop_flip(x, 32, torch.Generator().manual_seed(10)))


@pytest.mark.parametrize("side", [256, 255, 257, 9])
def test_center_crop_is_torchvision_center_crop(side: int) -> None:
    x = _images(3, 3, side, side + 3)
    size = 224 if side > 200 else 8
    got = center_crop(x, size)
    for i in range(3):
        assert torch.equal(got[i], TF2.center_crop(x[i], [size, size]))
    assert torch.equal(device_transform(x[:, :, :size, :size], size, False, None), x[:, :, :size, :size])


@pytest.mark.parametrize("wh", [(300, 257), (257, 300), (401, 299), (500, 375), (333, 500)])
def test_un_augmented_train_square_is_the_authors_eval_transform(wh: tuple[int, int]) -> None:
    """CenterCrop(224) of the stored square (Resize(256) + CenterCrop(256)) equals the authors'
    evaluation transform Resize(256) + CenterCrop(224) of the same photo, odd sizes included."""
    arr = np.random.default_rng(1).integers(0, 256, size=(wh[1], wh[0], 3), dtype=np.uint8)
    photo = Image.fromarray(arr)
    square = np.asarray(TF.center_crop(TF.resize(photo, [256]), [256, 256])).transpose(2, 0, 1)
    evaluated = np.asarray(TF.center_crop(TF.resize(photo, [256]), [224, 224])).transpose(2, 0, 1)
    got = device_transform(torch.from_numpy(square.copy())[None], 224, False, None)[0]
    assert np.array_equal(got.numpy(), evaluated)
