"""Tests of the model registry (CIFAR ResNets, MLPs, heads) and the knobs acting on a built model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from trainables.errors import WbsweepError
from trainables.heads import ETFClassifier
from trainables.models import ModelSpec, Network, build_model, fix_batchnorm_, weight_decay_groups


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet34_model() -> Network:
    torch.manual_seed(0)
    return build_model(ModelSpec("resnet34", num_classes=10, in_channels=3, image_size=32))


# --- ResNet32 ------------------------------------------------------------------------------------


def test_resnet32_parameter_count_and_features() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet32", num_classes=10, in_channels=3, image_size=32))
    # He et al.'s CIFAR ResNet32 with parameter-free (option A) shortcuts, counted by hand:
    stem = 3 * 16 * 9 + 2 * 16
    stage1 = 5 * (2 * 16 * 16 * 9 + 2 * 2 * 16)
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32) + 4 * (2 * 32 * 32 * 9 + 2 * 2 * 32)
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 2 * 2 * 64) + 4 * (2 * 64 * 64 * 9 + 2 * 2 * 64)
    fc = 64 * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + fc
    assert expected == 464_154
    total = n_params(model)
    assert abs(total - 464_000) / 464_000 < 0.01  # the well-known 0.46M
    assert total == expected
    assert model.feature_dim == 64
    model.eval()
    with torch.no_grad():
        feats = model.backbone(tiny_images())
        logits = model(tiny_images())
    assert feats.shape == (2, 64)
    assert logits.shape == (2, 10)
    # forward == classifier(backbone(x))
    torch.testing.assert_close(logits, model.classifier(feats))


# --- ResNet34 ------------------------------------------------------------------------------------


def reference_cifar_resnet34() -> nn.Module:
    ref = torchvision.models.resnet34()
    ref.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ref.maxpool = nn.Identity()
    ref.fc = nn.Identity()
    return ref


def test_resnet34_matches_torchvision_layout(resnet34_model: Network) -> None:
    ref = reference_cifar_resnet34()
    assert n_params(resnet34_model.backbone) == n_params(ref)
    assert resnet34_model.feature_dim == 512
    # same conv shapes, in the same order (3x3 stem, [3, 4, 6, 3] blocks, 1x1 shortcuts)
    ours = sorted(tuple(m.weight.shape) for m in resnet34_model.backbone.modules() if isinstance(m, nn.Conv2d))
    theirs = sorted(tuple(m.weight.shape) for m in ref.modules() if isinstance(m, nn.Conv2d))
    assert ours == theirs
    assert n_params(resnet34_model) == n_params(ref) + 512 * 10 + 10


def test_resnet34_stem_keeps_resolution(resnet34_model: Network) -> None:
    # The stem is the first 3x3 conv + BN + ReLU; hook the output of the first BatchNorm2d (no
    # max-pool may follow it) and of the whole stem, and check the final feature size.
    seen: list[tuple[int, ...]] = []
    first_conv = next(m for m in resnet34_model.backbone.modules() if isinstance(m, nn.Conv2d))
    first_bn = next(m for m in resnet34_model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert first_conv.kernel_size == (3, 3) and first_conv.stride == (1, 1) and first_conv.bias is None
    handles = [first_bn.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))]
    maxpools = [m for m in resnet34_model.backbone.modules() if isinstance(m, nn.MaxPool2d)]
    assert maxpools == []
    stem = getattr(resnet34_model.backbone, "stem", None)
    if stem is not None:
        handles.append(stem.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape))))
    resnet34_model.eval()
    try:
        with torch.no_grad():
            feats = resnet34_model.backbone(tiny_images())
    finally:
        for h in handles:
            h.remove()
    assert seen[0] == (2, 64, 32, 32)
    assert all(s == (2, 64, 32, 32) for s in seen)
    assert feats.shape == (2, 512)


# --- MLPs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [3, 4, 5])
@pytest.mark.parametrize("width", [None, 32])
def test_mlp_structure(depth: int, width: int | None) -> None:
    model = build_model(ModelSpec(f"mlp{depth}", num_classes=7, in_channels=1, image_size=8, width=width))
    w = width or 1024
    layers = [m for m in model.backbone.children() if not isinstance(m, nn.Flatten)]
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * depth
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, w)] + [(w, w)] * (depth - 1)
    assert all(m.bias is None for m in linears)
    assert all(m.num_features == w for m in layers if isinstance(m, nn.BatchNorm1d))
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (w, 7)
    assert model.feature_dim == w
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 7)


# --- names and heads -----------------------------------------------------------------------------


def test_unknown_model_suggests_closest() -> None:
    with pytest.raises(WbsweepError, match="resnt34") as info:
        build_model(ModelSpec("resnt34", num_classes=10, in_channels=3, image_size=32))
    assert "Did you mean 'resnet34'" in str(info.value)


def test_unknown_classifier() -> None:
    with pytest.raises(WbsweepError, match="cosine"):
        build_model(ModelSpec("mlp3", num_classes=10, in_channels=1, image_size=8, classifier="cosine", width=16))


def test_etf_classifier_weight_is_fixed() -> None:
    model = build_model(ModelSpec("mlp3", 5, in_channels=1, image_size=8, classifier="etf", width=16))
    head = model.classifier
    assert isinstance(head, ETFClassifier)
    param_ids = {id(p) for p in model.parameters()}
    assert id(head.weight) not in param_ids
    assert not head.weight.requires_grad
    assert "classifier.weight" in model.state_dict()
    assert "classifier.weight" not in dict(model.named_parameters())
    assert "classifier.bias" in dict(model.named_parameters())
    # unit rows with pairwise cosine -1/(C-1)
    gram = head.weight.double() @ head.weight.double().T
    expected = (5 / 4) * (torch.eye(5, dtype=torch.float64) - 1 / 5)
    torch.testing.assert_close(gram, expected, atol=1e-5, rtol=0)
    before = head.weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 5
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(head.weight, before)
    assert not torch.equal(head.bias.detach(), torch.zeros(5))  # the bias did train


# --- fixed BatchNorm -----------------------------------------------------------------------------


def test_fix_batchnorm_survives_sgd_and_shortcuts_still_train() -> None:
    torch.manual_seed(1)
    model = build_model(ModelSpec("resnet34", num_classes=10, in_channels=3, image_size=32))
    s = 0.07
    fix_batchnorm_(model, s)
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(bns) == 1 + 2 * 16 + 3  # stem, two per block, three downsample BNs
    shortcuts = [m.downsample[0] for m in model.backbone.modules() if getattr(m, "downsample", None) is not None]
    assert len(shortcuts) == 3 and all(c.kernel_size == (1, 1) for c in shortcuts)
    shortcut_before = [c.weight.detach().clone() for c in shortcuts]
    # every parameter is handed to SGD, with weight decay and momentum: frozen ones must not move
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    model.train()
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):  # 16x16 inputs keep this fast; the resolution does not matter here
        x = torch.randn(2, 3, 16, 16, generator=gen)
        y = torch.randint(0, 10, (2,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for bn in bns:
        assert torch.equal(bn.weight.detach(), torch.full_like(bn.weight, s))
        assert torch.equal(bn.bias.detach(), torch.zeros_like(bn.bias))
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
    for conv, before in zip(shortcuts, shortcut_before, strict=True):
        assert conv.weight.requires_grad
        assert not torch.equal(conv.weight.detach(), before)


# --- weight-decay groups -------------------------------------------------------------------------


def decayed_names(model: Network, groups: list[dict], wd: float) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = set(), set()
    for g in groups:
        target = decay if g["weight_decay"] == wd else no_decay
        assert g["weight_decay"] in (wd, 0.0)
        target.update(names[id(p)] for p in g["params"])
    return decay, no_decay


def expected_conv_only(model: Network) -> set[str]:
    """Backbone Conv2d weights, and backbone Linear weights (MLPs), found by module type."""
    out = set()
    for name, m in model.backbone.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out.add(f"backbone.{name}.weight")
    return out


MODEL_CASES = [
    ("resnet32", 3, 32, None, "linear"),
    ("resnet34", 3, 32, None, "linear"),
    ("mlp3", 1, 8, 16, "linear"),
    ("mlp5", 1, 8, 16, "etf"),
]


@pytest.mark.parametrize(("name", "cin", "size", "width", "head"), MODEL_CASES)
def test_weight_decay_scope_all(name: str, cin: int, size: int, width: int | None, head: str) -> None:
    model = build_model(ModelSpec(name, 10, cin, size, classifier=head, width=width))
    groups = weight_decay_groups(model, 0.003, "all")
    decay, no_decay = decayed_names(model, groups, 0.003)
    assert decay == {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay == set()


@pytest.mark.parametrize(("name", "cin", "size", "width", "head"), MODEL_CASES)
@pytest.mark.parametrize("fixed_bn", [False, True])
def test_weight_decay_scope_conv_only(
    name: str, cin: int, size: int, width: int | None, head: str, fixed_bn: bool
) -> None:
    model = build_model(ModelSpec(name, 10, cin, size, classifier=head, width=width))
    if fixed_bn:
        fix_batchnorm_(model, 0.1)
    groups = weight_decay_groups(model, 0.003, "conv_only")
    decay, no_decay = decayed_names(model, groups, 0.003)
    conv = expected_conv_only(model)
    assert conv  # the model has some
    assert decay == conv
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay == trainable - conv
    assert decay.isdisjoint(no_decay)
    # nothing of BN, the classifier or any bias decays
    bn_names = {f"backbone.{n}.{k}" for n, m in model.backbone.named_modules()
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for k in ("weight", "bias")}
    assert not decay & bn_names
    assert not any(n.startswith("classifier.") or n.endswith(".bias") for n in decay)
    if fixed_bn:
        assert not (decay | no_decay) & bn_names  # frozen parameters are in no group


@pytest.mark.parametrize(("name", "cin", "size", "width", "head"), MODEL_CASES)
def test_weight_decay_conv_only_with_linear_layers_is_everything_but_bn(
    name: str, cin: int, size: int, width: int | None, head: str
) -> None:
    """The authors' code without BN decay: convolutions and every nn.Linear (weight and bias,
    the classifier's too), nothing of BN."""
    model = build_model(ModelSpec(name, 10, cin, size, classifier=head, width=width))
    decay, no_decay = decayed_names(model, weight_decay_groups(model, 0.003, "conv_only", conv_only_linear=True), 0.003)
    bn = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
          for k in ("weight", "bias")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay == trainable & bn and decay == trainable - bn
    classifier = {n for n in trainable if n.startswith("classifier.")}
    assert classifier and classifier <= decay  # the linear head's weight and bias, or the ETF head's bias


def test_weight_decay_unknown_scope() -> None:
    model = build_model(ModelSpec("mlp3", 10, 1, 8, width=8))
    with pytest.raises(WbsweepError, match="bn_only"):
        weight_decay_groups(model, 0.1, "bn_only")
