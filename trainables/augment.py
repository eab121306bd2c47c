"""Device-side RandomResizedCrop + RandomHorizontalFlip, batched: the authors' ImageNet training transform.

The paper's mini-ImageNet-LT protocol (the authors' ``utils/data_units.py``, torchvision's ImageNet
recipe) trains with ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()`` and evaluates with
``Resize(256)`` + ``CenterCrop(224)``. The prepared training images are stored as the centre
``R x R`` square of the image resized to shorter side R (R = 256; trainables/mini_imagenet.py);
this module draws and applies the random resized crop on that square, on the training device, for a
whole batch at once:

* :func:`draw_resized_crop_flip` draws per-image boxes with the distribution of torchvision's
  ``RandomResizedCrop.get_params`` (scale 0.08-1 of the image area, log-uniform aspect ratio in
  [3/4, 4/3], up to 10 tries, then the central fall-back) and a flip with p = 1/2, from a
  ``torch.Generator`` on the device, without a per-image Python loop;
* :func:`resized_crop_flip_at` cuts each box and resizes it to ``size x size`` exactly as
  torchvision's ``resized_crop`` does on a PIL image (Pillow's antialiased bilinear resize, bit
  for bit), then mirrors it;
* :func:`center_crop` is ``CenterCrop(size)``: applied to an un-augmented stored training square it
  gives exactly the authors' evaluation transform (``Resize(256)`` + ``CenterCrop(224)``), because
  torchvision's centre offsets ``round((H - 224) / 2)`` and ``round((H - 256) / 2) + 16`` agree
  (16 is even, so round-half-to-even commutes with adding it).

Why not a loop of ``resized_crop`` per image: each box has its own size, so no library resize
takes the batch at once, and a loop costs a few kernel launches per image on a GPU. Pillow's
resize is separable: each output pixel of a pass is a fixed-point weighted sum of at most K
consecutive source pixels (K <= 4 for boxes up to 256 px resized to 224). :func:`_taps` computes
those indices and weights as Pillow does (libImaging/Resample.c), for every image at once; a pass is
then K ``index_select`` of whole image rows and integer multiply-adds. Why Pillow and not
``F.interpolate(antialias=True)``: the authors' transforms run on PIL images, and torchvision's
tensor kernels are themselves only within 1 level of Pillow (measured in tests/test_augment.py).
Measured on 2 CPU cores shared with other jobs, batch 64 of 256-px squares to 224: 0.4-1.2 s
batched (the draw itself 0.2 ms) against 0.02-0.09 s for a loop of torchvision's native uint8 CPU
kernel and 0.03 s for a loop of Pillow, so on a CPU a loop would be faster; on a GPU the batched
version is about 30 kernel launches per chunk whatever its size (not measured here: no GPU). CPU training
at 224 px is not a use case (a ResNet step at batch 64 costs seconds there).
"""

from __future__ import annotations

import math

import torch

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults: area fraction of the image
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratio w / h, drawn log-uniformly
TRIES = 10  # torchvision's get_params tries this many boxes before the central fall-back


def draw_resized_crop_flip(
    b: int, height: int | torch.Tensor, width: int | torch.Tensor, generator: torch.Generator | None,
    device: torch.device | str = "cpu", scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image boxes (top, left, h, w), int64 (B,) each, and flips, bool (B,), for images of
    ``height`` x ``width`` pixels (ints, or (B,) tensors for images of different sizes).

    The distribution of torchvision's ``RandomResizedCrop.get_params(img, scale, ratio)`` per image:
    try up to 10 times target area = H * W * U(scale) and aspect ratio r = exp(U(log ratio)),
    w = round(sqrt(area * r)), h = round(sqrt(area / r)) (half to even, as Python's ``round``); the
    first try with 0 < w <= W and 0 < h <= H wins, and its corner is uniform: top in 0..H-h, left in
    0..W-w. If all 10 fail, the central box of the image clamped to the ratio range. The flip is
    torchvision's RandomHorizontalFlip (p = 1/2).

    All 10 tries of every image are drawn at once, so the draws consume ``generator`` differently
    from torchvision's sequential global-RNG calls: the same distribution, not the same stream.
    Draw order: the (B, 10, 2) uniforms of the tries, then the (B, 2) uniforms of the corner, then
    the (B,) flip uniforms; the box arithmetic is float64 (torchvision's is Python floats)."""
    f64 = torch.float64
    hh = torch.as_tensor(height, device=device).to(f64).expand(b)
    ww = torch.as_tensor(width, device=device).to(f64).expand(b)
    u = torch.rand(b, TRIES, 2, device=device, dtype=f64, generator=generator)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    target = (hh * ww)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= ww[:, None]) & (h > 0) & (h <= hh[:, None])
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # index of the first successful try (0 if none)
    found = ok.any(1)
    # the central fall-back, as get_params: whole image, or its ratio clamped to the range
    in_ratio = ww / hh
    fw = torch.where(in_ratio < min(ratio), ww, torch.where(in_ratio > max(ratio), torch.round(hh * max(ratio)), ww))
    fh = torch.where(in_ratio < min(ratio), torch.round(ww / min(ratio)), hh)
    h = torch.where(found, h.gather(1, first)[:, 0], fh)
    w = torch.where(found, w.gather(1, first)[:, 0], fw)
    corner = torch.rand(b, 2, device=device, dtype=f64, generator=generator)
    top = torch.where(found, torch.minimum(torch.floor(corner[:, 0] * (hh - h + 1)), hh - h),
                      torch.floor((hh - h) / 2))
    left = torch.where(found, torch.minimum(torch.floor(corner[:, 1] * (ww - w + 1)), ww - w),
                       torch.floor((ww - w) / 2))
    flip = torch.rand(b, device=device, generator=generator) < 0.5
    i64 = torch.int64
    return top.to(i64), left.to(i64), h.to(i64), w.to(i64), flip


PRECISION_BITS = 22  # Pillow's fixed-point weights for 8-bit images (32 - 8 - 2, libImaging/Resample.c)


def _taps(start: torch.Tensor, length: torch.Tensor, size: int, source: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and fixed-point weights, (B, size, K) int64 and int32, of Pillow's bilinear
    resize of the segment [start, start + length) of an axis of ``source`` pixels to ``size`` pixels.

    Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (libImaging/Resample.c), step for step
    in float64 so that every weight is the same double: scale = length / size, filterscale =
    max(scale, 1), support = 1 * filterscale, centre = (o + 0.5) * scale, window = the pixels
    int(centre - support + 0.5) .. int(centre + support + 0.5) - 1 of the segment, weight =
    triangle((x + xmin - centre + 0.5) * (1 / filterscale)), divided by the window's sum (summed
    left to right), then int(0.5 + weight * 2**22). PyTorch's antialiased bilinear
    (``_compute_weights_aa``) uses the same filter in floating point. Taps past the window get
    weight 0 (and a valid index)."""
    f64 = torch.float64
    k = int(2 * max(1.0, source / size)) + 2  # the widest window any box inside the source can need
    length = length.to(f64)[:, None, None]
    scale = length / size  # (B, 1, 1)
    filterscale = torch.clamp(scale, min=1.0)
    centre = (torch.arange(size, device=start.device, dtype=f64)[None, :, None] + 0.5) * scale  # (B, size, 1)
    xmin = torch.clamp(torch.floor(centre - filterscale + 0.5), min=0.0)  # C's int() of a value > -1 then max 0
    xmax = torch.minimum(torch.floor(centre + filterscale + 0.5), length)
    j = xmin + torch.arange(k, device=start.device, dtype=f64)  # (B, size, K), relative to the segment start
    w = torch.clamp(1.0 - torch.abs((j - centre + 0.5) * (1.0 / filterscale)), min=0.0) * (j < xmax)
    total = w[..., 0]
    for t in range(1, k):  # left to right, as Pillow sums (adding the zeros past the window is exact)
        total = total + w[..., t]
    w = torch.where(total[..., None] != 0, w / total[..., None], w)
    fixed = torch.floor(0.5 + w * (1 << PRECISION_BITS)).to(torch.int32)
    idx = torch.clamp(j + start.to(f64)[:, None, None], max=source - 1).to(torch.int64)
    return idx, fixed


def _pass(rows: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One Pillow resampling pass along the first axis: ``rows`` (B * N, M) uint8, each row one
    source pixel line of an image; ``idx``/``weights`` (B * size, K) with indices into ``rows``:
    uint8 (B * size, M) = clip8((2**21 + sum_t weight_t * rows[idx_t]) >> 22), exact in int32
    (the sum is at most 255 * (2**22 + K) + 2**21 < 2**31)."""
    acc = torch.full((idx.shape[0], rows.shape[1]), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=rows.device)
    for t in range(idx.shape[1]):  # K <= 4 taps
        acc += rows.index_select(0, idx[:, t]).to(torch.int32) * weights[:, t, None]
    return torch.clamp(acc >> PRECISION_BITS, 0, 255).to(torch.uint8)


def _resize_h_first(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                    size: int) -> torch.Tensor:
    """Pillow's two-pass resize of each box of ``x`` (B, C, H, W) uint8 to (size, size): the
    horizontal pass first, its result rounded to uint8, then the vertical pass."""
    b, c, hs, ws = x.shape
    ri, rw = _taps(top, h, size, hs)  # (B, size, K)
    ci, cw = _taps(left, w, size, ws)
    base = torch.arange(b, device=x.device)[:, None, None]
    # horizontal pass: each image column (all channels, all rows) is one row of a (B*W, C*H) matrix
    cols = x.permute(0, 3, 1, 2).reshape(b * ws, c * hs)
    mid = _pass(cols, (ci + base * ws).reshape(b * size, -1), cw.reshape(b * size, -1))  # (B*size_w, C*H)
    # vertical pass: each row of the intermediate (all channels, size columns) is one row
    mid = mid.view(b, size, c, hs).permute(0, 3, 2, 1).reshape(b * hs, c * size)
    out = _pass(mid, (ri + base * hs).reshape(b * size, -1), rw.reshape(b * size, -1))  # (B*size_h, C*size_w)
    return out.view(b, size, c, size).permute(0, 2, 1, 3)


def vertical_first(h: torch.Tensor, w: torch.Tensor, size: int) -> torch.Tensor:
    """Where Pillow >= 13 runs the vertical pass first for a (h, w) box resized to (size, size):
    height reduced, by more than twice the width's reduction (python-pillow/Pillow#9549; found
    to hold exactly on every box shape tests/test_augment.py compares). Pillow <= 12, the authors'
    time, always ran the horizontal pass first; the two orders differ by at most 1 level at some
    pixels (the intermediate is rounded to uint8)."""
    return (h > size) & (h - size > 2 * (w - size))


def resized_crop_flip_at(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor,
                         w: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Image i of the uint8 batch ``x`` (B, C, H, W) cut to rows top[i]..top[i]+h[i]-1 and columns
    left[i]..left[i]+w[i]-1, resized to ``size`` x ``size`` (bilinear, antialiased) and mirrored
    left-right where ``flip[i]``: uint8 (B, C, size, size). Boxes must lie inside the image.

    Per image this is, bit for bit, torchvision's ``hflip(resized_crop(pil_image, top, left, h, w,
    [size, size]))`` on the PIL image, which is what the authors' RandomResizedCrop +
    RandomHorizontalFlip compute (their dataset hands PIL images to the transforms): Pillow's
    two-pass resize with its fixed-point weights (:func:`_taps`), the intermediate rounded to uint8,
    passes in Pillow's order (:func:`vertical_first`). All integer arithmetic, so the result does
    not depend on the device, TF32 or autocast. On uint8 *tensors* torchvision itself is not
    bit-identical to Pillow (its CPU uint8 kernel and its float path each differ from Pillow by 1
    level at some pixels); tests/test_augment.py bounds those differences too.

    A vertical-first box is resized as the horizontal-first resize of the transposed image; for
    square images (the stored training squares) the transposition is a per-image select, otherwise
    both orders are computed and selected."""
    vf = vertical_first(h, w, size)
    sel = vf[:, None, None, None]
    swap = (torch.where(vf, left, top), torch.where(vf, top, left), torch.where(vf, w, h), torch.where(vf, h, w))
    if x.shape[2] == x.shape[3]:
        out = _resize_h_first(torch.where(sel, x.transpose(2, 3), x), *swap, size)
        out = torch.where(sel, out.transpose(2, 3), out)
    else:
        out = torch.where(sel, _resize_h_first(x.transpose(2, 3), left, top, w, h, size).transpose(2, 3),
                          _resize_h_first(x, top, left, h, w, size))
    return torch.where(flip[:, None, None, None], out.flip(3), out).contiguous()


def resized_crop_flip(x: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip() of a uint8 batch (B, C, H, W), per image
    (torchvision's distribution: :func:`draw_resized_crop_flip`; its resize:
    :func:`resized_crop_flip_at`): uint8 (B, C, size, size)."""
    return resized_crop_flip_at(x, *draw_resized_crop_flip(x.shape[0], x.shape[2], x.shape[3], generator,
                                                           x.device), size)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's ``CenterCrop(size)`` of a batch (B, C, H, W) with H, W >= size: top =
    round((H - size) / 2), left = round((W - size) / 2) (Python's round, as torchvision); a view."""
    top, left = int(round((x.shape[2] - size) / 2.0)), int(round((x.shape[3] - size) / 2.0))
    return x[:, :, top : top + size, left : left + size]


def device_transform(x: torch.Tensor, size: int, augment: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The authors' ImageNet transforms on stored uint8 images (B, C, H, W): RandomResizedCrop(size) +
    flip when ``augment``, else CenterCrop(size) (a no-op for validation/test images stored at size)."""
    if augment:
        return resized_crop_flip(x, size, generator)
    return x if x.shape[2] == x.shape[3] == size else center_crop(x, size)
