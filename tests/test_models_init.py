"""Initialisation as the reference implementations (issue: the authors' protocol, exactly).

resnet34 / resnext50: tensor for tensor what the authors' ``utils/network_arch_resnet.py`` builds
for the same seed (torchvision's constructor, then a new stem convolution, then the classifier).
resnet32: the statistics of LDAM-DRW's CIFAR ResNet32 init (Kaiming-normal, fan_in, on every
convolution and on the linear classifier), checked against the formula std = sqrt(2 / fan_in).
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from trainables.models import ModelSpec, build_model


def authors_model(ctor, num_classes: int, image_size: int) -> nn.Module:
    """The authors' construction order (``ResnetEncoder.construct_encoder`` then ``encoder.fc``)."""
    encoder = ctor()
    big = image_size >= 64
    encoder.conv1 = nn.Conv2d(3, 64, kernel_size=7 if big else 3, stride=2 if big else 1, padding=3 if big else 1,
                              bias=False)
    encoder.fc = nn.Linear(encoder.fc.in_features, num_classes)
    return encoder


@pytest.mark.parametrize(("name", "ctor", "size"), [
    ("resnet34", torchvision.models.resnet34, 32),
    ("resnet34", torchvision.models.resnet34, 224),
    ("resnext50", torchvision.models.resnext50_32x4d, 32),
])
def test_backbone_init_equals_the_authors_torchvision_model(name: str, ctor, size: int) -> None:
    torch.manual_seed(7)
    ours = build_model(ModelSpec(name, 100, 3, size))
    torch.manual_seed(7)
    ref = authors_model(ctor, 100, size)
    ref_state = ref.state_dict()
    ours_state = {k.removeprefix("backbone.").replace("classifier.", "fc."): v for k, v in ours.state_dict().items()}
    assert set(ours_state) == set(ref_state)
    for key, value in ref_state.items():
        assert torch.equal(ours_state[key], value), key
    # the statistics the issue measured: torchvision's init, not PyTorch's default (std 0.024)
    w = ours.backbone.layer1[0].conv1.weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]  # kaiming_normal_(mode="fan_out"): resnet34 64 * 3 * 3
    assert abs(w.std().item() - math.sqrt(2 / fan_out)) < 0.1 * math.sqrt(2 / fan_out)  # resnet34: 0.059
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0)
               for m in ours.modules() if isinstance(m, nn.BatchNorm2d))


def test_resnet34_conv_norm_is_torchvision_scale() -> None:
    """The total convolution-weight norm at init: ~123 for the authors' model, ~53 for PyTorch's
    default init (what this project had before)."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet34", 100, 3, 32))
    sq = sum(m.weight.pow(2).sum().item() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert 115 < math.sqrt(sq) < 131


def test_resnet32_init_statistics_match_ldam_drw() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet32", 100, 3, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31
    for m in convs + [model.classifier]:
        w = m.weight.detach().double()
        fan_in = w[0].numel()
        expected = math.sqrt(2.0 / fan_in)  # kaiming_normal_ defaults: fan_in, gain sqrt(2)
        # the sample std of n normal draws is within ~4 sigma * expected / sqrt(2n) of the truth
        tol = 4 * expected / math.sqrt(2 * w.numel()) + 1e-12
        assert abs(w.std().item() - expected) < tol, (tuple(w.shape), w.std().item(), expected)
        assert abs(w.mean().item()) < 4 * expected / math.sqrt(w.numel())
    # PyTorch's default (kaiming_uniform with a = sqrt(5)) would give std sqrt(1/(3 fan_in)): 2.4x smaller
    first = convs[1].weight
    assert first.std().item() > 1.8 * math.sqrt(1.0 / (3 * first[0].numel()))


@pytest.mark.parametrize(("name", "ctor", "dim"), [("resnet34", torchvision.models.resnet34, 512),
                                                  ("resnext50", torchvision.models.resnext50_32x4d, 2048)])
def test_a_narrow_model_is_torchvisions_layout_scaled_with_its_init_scheme(name: str, ctor, dim: int) -> None:
    torch.manual_seed(0)
    narrow = build_model(ModelSpec(name, 10, 3, 32, width=16))
    assert narrow.feature_dim == dim // 4
    ref = ctor()
    # the same modules, names and block types, each convolution a quarter as wide
    ours = sorted((n, type(m).__name__, tuple(m.weight.shape) if isinstance(m, nn.Conv2d) else ())
                  for n, m in narrow.backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, *BLOCKS)))
    theirs = sorted((n, type(m).__name__, tuple(m.weight.shape) if isinstance(m, nn.Conv2d) else ())
                    for n, m in ref.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, *BLOCKS)))
    assert [(n, t) for n, t, _ in ours] == [(n, t) for n, t, _ in theirs]
    for (n, _, a), (_, _, b) in zip(ours, theirs, strict=True):
        if a and n != "conv1":  # the stem differs (CIFAR)
            assert a[0] * 4 == b[0] and (a[1] * 4 == b[1] or a[1] == b[1]), n
    w = narrow.backbone.layer2[0].conv1.weight  # kaiming_normal_(fan_out): std sqrt(2 / (out * k * k))
    expected = math.sqrt(2 / (w.shape[0] * w.shape[2] * w.shape[3]))
    assert abs(w.std().item() - expected) < 0.1 * expected
    with torch.no_grad():
        assert narrow.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


BLOCKS = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
