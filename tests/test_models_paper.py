"""The models the other tables and figures need: ResNeXt50 (Table 10), the ImageNet stem
(mini-ImageNet), ResBlock1/2 (Table 3), and the WD scope of figure 2's "WD w/o shift"."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from trainables.models import (
    BN_TYPES,
    ModelSpec,
    ResBlock1d,
    build_model,
    fix_batchnorm_,
    weight_decay_groups,
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnext50_matches_torchvision_with_the_cifar_stem() -> None:
    ref = torchvision.models.resnext50_32x4d()
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool = nn.Identity()
    ref.fc = nn.Identity()
    model = build_model(ModelSpec("resnext50", 100, 3, 32))
    assert model.feature_dim == 2048
    assert n_params(model.backbone) == n_params(ref)
    ours = sorted((tuple(m.weight.shape), m.groups) for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    theirs = sorted((tuple(m.weight.shape), m.groups) for m in ref.modules() if isinstance(m, nn.Conv2d))
    assert ours == theirs
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert model.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


@pytest.mark.parametrize(("name", "ref_fn", "dim"), [
    ("resnet34", torchvision.models.resnet34, 512), ("resnext50", torchvision.models.resnext50_32x4d, 2048),
])
def test_224px_inputs_get_the_imagenet_stem(name: str, ref_fn, dim: int) -> None:
    model = build_model(ModelSpec(name, 100, 3, 224))
    ref = ref_fn()
    ref.fc = nn.Identity()
    assert n_params(model.backbone) == n_params(ref)  # torchvision's ImageNet model exactly
    net = model.backbone
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2) and isinstance(net.maxpool, nn.MaxPool2d)
    model.eval()
    with torch.no_grad():
        assert model.backbone(torch.randn(1, 3, 224, 224)).shape == (1, dim)


@pytest.mark.parametrize("blocks", [1, 2])
def test_resblock_structure(blocks: int) -> None:
    model = build_model(ModelSpec(f"resblock{blocks}", 10, 1, 28))
    layers = list(model.backbone.children())
    assert isinstance(layers[0], nn.Flatten)
    assert isinstance(layers[1], nn.Linear) and (layers[1].in_features, layers[1].out_features) == (784, 1024)
    assert isinstance(layers[2], nn.BatchNorm1d) and isinstance(layers[3], nn.ReLU)
    res = layers[4:]
    assert len(res) == blocks and all(isinstance(b, ResBlock1d) for b in res)
    assert model.feature_dim == 1024 and model.classifier.in_features == 1024
    assert all(m.bias is None for m in model.backbone.modules() if isinstance(m, nn.Linear))
    # the block adds its input: with the residual branch zeroed it is ReLU(x)
    block = res[0]
    block.eval()
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        x = torch.randn(4, 1024)
        assert torch.equal(block(x), torch.relu(x))


@pytest.mark.parametrize("name", ["mlp3", "resblock1", "resnet34"])
def test_weight_decay_without_bn_shift(name: str) -> None:
    model = build_model(ModelSpec(name, 10, 3 if name == "resnet34" else 1, 8, width=None if name == "resnet34" else 8))
    groups = weight_decay_groups(model, 0.01, "no_bn_shift")
    decay = {id(p) for g in groups if g["weight_decay"] == 0.01 for p in g["params"]}
    shifts = {id(m.bias) for m in model.modules() if isinstance(m, BN_TYPES)}
    scales = {id(m.weight) for m in model.modules() if isinstance(m, BN_TYPES)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decay == trainable - shifts  # everything else decays, BN scales and the classifier included
    assert scales <= decay and id(model.classifier.weight) in decay and id(model.classifier.bias) in decay


def test_fixed_bn_freezes_resnext_bns_and_its_shortcuts_train() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnext50", 10, 3, 8))
    fix_batchnorm_(model, 0.05)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.01)
    shortcut = next(m.downsample[0] for m in model.modules() if getattr(m, "downsample", None) is not None)
    before = shortcut.weight.detach().clone()
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.arange(4)).backward()
    opt.step()
    for bn in (m for m in model.modules() if isinstance(m, BN_TYPES)):
        assert (bn.weight == 0.05).all() and (bn.bias == 0).all()
    assert not torch.equal(shortcut.weight, before)
