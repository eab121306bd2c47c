"""Model registry: backbones that map images to a feature vector, plus a classifier head.

Every model is a :class:`Network` = ``backbone`` (images -> d-dim features, the classifier's input,
where FDR is measured) + ``classifier`` (``nn.Linear`` or the fixed ETF head). Keeping the two apart
lets the trainer add feature regularisation, freeze the backbone for WB's second stage and read
features for the analyses without model-specific code.

Add a model by writing a builder ``(in_channels, image_size, width) -> backbone`` and registering it
in :data:`BACKBONES`.

Initialisation follows the implementation each model is taken from (docs/DESIGN.md section 4), because
in a study of weight decay and weight norms the starting norms are part of the experiment:

* ``resnet34`` and ``resnext50`` are torchvision's models built as the authors' code builds them
  (constructor, then a new stem convolution; torchvision's initialisation). Images under 64 px (CIFAR)
  get the CIFAR stem (3x3 stride-1 convolution, no max-pool, as in both official codebases), larger
  images (mini-ImageNet, 224 px) torchvision's ImageNet stem (7x7 stride 2 + 3x3 stride-2 max-pool).
* ``resnet32`` has no torchvision counterpart: it is initialised as LDAM-DRW's CIFAR ResNet32, the
  implementation the long-tailed literature uses (Kaiming-normal on convolutions and the linear
  classifier).
* The MLPs and ResBlocks keep PyTorch's default initialisation, as the authors' ``BNMLP``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainables.errors import WbsweepError, unknown_name
from trainables.heads import ETFClassifier


class Network(nn.Module):
    """Backbone + classifier. ``forward`` returns logits; ``backbone(x)`` returns features."""

    def __init__(self, backbone: nn.Module, feature_dim: int, classifier: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.classifier = classifier
        self.spec: ModelSpec | None = None  # what built it (build_model): saved beside the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


# --- CIFAR ResNets -----------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """He et al.'s CIFAR ResNet block (option A): 3x3-3x3 convolutions, the shortcut a parameter-free
    subsample + zero-padding of the new channels where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x
        if self.stride != 1 or self.pad:
            identity = x[:, :, :: self.stride, :: self.stride]
            identity = F.pad(identity, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + identity)


IMAGENET_STEM_FROM = 64  # images at least this many pixels wide get the ImageNet stem


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (3x3 stride-1 stem, three stages, option-A shortcuts, global average
    pool), initialised as the LTR literature's ResNet32 (LDAM-DRW's ``resnet_cifar.py``, used by the
    weight-balancing codebases): Kaiming-normal (fan_in) on every convolution and linear layer, BN
    weight 1 and bias 0. The classifier is built by :func:`build_model` and initialised there."""

    def __init__(self, in_channels: int, widths: list[int], blocks: list[int]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


def resnet32(in_channels: int, image_size: int, width: int | None) -> tuple[nn.Module, int]:
    """He et al.'s CIFAR ResNet32: 3 stages x 5 blocks, widths 16-32-64, 64-d features (see
    :class:`CifarResNet` for its initialisation)."""
    w = width or 16
    return CifarResNet(in_channels, [w, 2 * w, 4 * w], [5, 5, 5]), 4 * w


def _swap_stem(net: nn.Module, in_channels: int, width: int, image_size: int) -> None:
    """A new stem convolution in place of ``net.conv1`` (PyTorch's default initialisation, drawn now,
    as the authors' code does): 3x3 stride 1 and no max-pool for images under ``IMAGENET_STEM_FROM``
    px (CIFAR), torchvision's 7x7 stride 2 with its max-pool otherwise."""
    if image_size >= IMAGENET_STEM_FROM:
        net.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    else:
        net.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()


class NarrowResNet(nn.Module):
    """torchvision's ResNet layout (``conv1``, ``bn1``, ``layer1``..``layer4``, built from torchvision's
    own ``BasicBlock`` / ``Bottleneck``) at stage widths w, 2w, 4w, 8w instead of 64-512, with
    torchvision's initialisation scheme (Kaiming-normal fan_out on convolutions, BN weight 1 and bias
    0; the stem swapped afterwards): a CPU-sized stand-in for the paper's models (the cpu presets'
    ``width``). torchvision's ``ResNet`` fixes its widths, hence this class; at w = 64 the paper
    presets use torchvision's own model instead (:func:`_torchvision_resnet`)."""

    def __init__(self, block: type, layers: list[int], width: int, in_channels: int, image_size: int,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(layers):
            planes, blocks = width * 2**i, []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                cout = planes * block.expansion
                down = None
                if stride != 1 or cin != cout:
                    down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                blocks.append(block(cin, planes, stride, down, groups, width_per_group))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        _swap_stem(self, in_channels, width, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _torchvision_resnet(name: str, block_name: str, groups: int, width_per_group: int,
                        dim: int) -> Callable[[int, int, int | None], tuple[nn.Module, int]]:
    """The builder of torchvision's ``torchvision.models.<name>`` (blocks ``<block_name>``). torchvision
    is imported when a model is built, not with this module: importing it takes seconds (it imports
    torch's compiler stack), and the CLI reads this registry for every spec it loads."""
    def build(in_channels: int, image_size: int, width: int | None) -> tuple[nn.Module, int]:
        """torchvision's model built as the authors' ``utils/network_arch_resnet.py`` builds it, so it
        carries torchvision's initialisation (Kaiming-normal fan_out on every convolution, BN weight
        1 and bias 0): the constructor first, then a new stem convolution (:func:`_swap_stem`).
        ``fc`` becomes the identity: :func:`build_model` adds the classifier (drawn next, as the
        authors' ``encoder.fc``). Module names are torchvision's (``conv1``, ``layer1.0.conv1``, ...).
        Another ``width`` than 64 gives :class:`NarrowResNet` (same layout and scheme, not the same
        tensors)."""
        from torchvision.models import resnet as tv_resnet

        if width not in (None, 64):
            block = getattr(tv_resnet, block_name)
            return NarrowResNet(block, [3, 4, 6, 3], width, in_channels, image_size, groups, width_per_group), \
                dim * width // 64
        net = getattr(tv_resnet, name)()
        _swap_stem(net, in_channels, 64, image_size)
        net.fc = nn.Identity()
        return net, dim

    return build


#: The CIFAR "ResNet34" of the authors' code: torchvision's [3, 4, 6, 3] BasicBlock layout, 1x1
#: conv shortcuts, widths 64-512, 512-d features.
resnet34 = _torchvision_resnet("resnet34", "BasicBlock", 1, 64, 512)
#: ResNeXt50 (32x4d) as in torchvision and Table 10: bottleneck blocks [3, 4, 6, 3], cardinality 32,
#: base width 4, 2048-d features.
resnext50 = _torchvision_resnet("resnext50_32x4d", "Bottleneck", 32, 4, 2048)


# --- MLPs for small inputs -------------------------------------------------------------------


def _mlp(depth: int) -> Callable[[int, int, int | None], tuple[nn.Module, int]]:
    def build(in_channels: int, image_size: int, width: int | None) -> tuple[nn.Module, int]:
        """MLPn of the paper's appendix 7.5.2: n x [Linear (no bias) -> width, BN1d, ReLU]."""
        w = width or 1024
        layers: list[nn.Module] = [nn.Flatten()]
        cin = in_channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(cin, w, bias=False), nn.BatchNorm1d(w), nn.ReLU()]
            cin = w
        return nn.Sequential(*layers), w

    return build


class ResBlock1d(nn.Module):
    """He et al.'s residual block with linear layers (paper appendix 7.5.2): Linear (no bias) -> BN
    -> ReLU -> Linear (no bias) -> BN, plus the identity, then ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width, bias=False)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.fc1(x)))
        return F.relu(self.bn2(self.fc2(out)) + x)


def _resblock(blocks: int) -> Callable[[int, int, int | None], tuple[nn.Module, int]]:
    def build(in_channels: int, image_size: int, width: int | None) -> tuple[nn.Module, int]:
        """ResBlockn of the paper's appendix 7.5.2: one MLP block (Linear (no bias) -> width, BN1d,
        ReLU), then n residual blocks of width ``width``."""
        w = width or 1024
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_channels * image_size * image_size, w, bias=False),
                                   nn.BatchNorm1d(w), nn.ReLU()]
        layers += [ResBlock1d(w) for _ in range(blocks)]
        return nn.Sequential(*layers), w

    return build


BACKBONES: dict[str, Callable[[int, int, int | None], tuple[nn.Module, int]]] = {
    "resnet32": resnet32,
    "resnet34": resnet34,
    "resnext50": resnext50,
    "mlp3": _mlp(3),
    "mlp4": _mlp(4),
    "mlp5": _mlp(5),
    "resblock1": _resblock(1),
    "resblock2": _resblock(2),
}
#: Models whose linear classifier is initialised Kaiming-normal (fan_in) rather than PyTorch's default:
#: LDAM-DRW's ResNet32 initialises every linear layer so.
KAIMING_CLASSIFIER = frozenset({"resnet32"})
def residual_blocks() -> tuple[type, ...]:
    """Blocks whose output is a residual sum (after its ReLU): the per-layer analyses hook them."""
    from torchvision.models import resnet as tv_resnet

    return BasicBlock, tv_resnet.BasicBlock, tv_resnet.Bottleneck, ResBlock1d


def model_names() -> list[str]:
    return sorted(BACKBONES)


def check_model_name(name: str) -> None:
    if name not in BACKBONES:
        raise unknown_name("model", name, model_names())


@dataclass
class ModelSpec:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    classifier: str = "linear"  # "linear" | "etf"
    etf_bias: bool = True
    width: int | None = None
    etf_seed: int = 0


def build_model(spec: ModelSpec) -> Network:
    """Build a :class:`Network`. The ETF head is seeded separately from the weights so that every
    seed of a method shares the same fixed classifier geometry only when ``etf_seed`` says so."""
    check_model_name(spec.name)
    backbone, dim = BACKBONES[spec.name](spec.in_channels, spec.image_size, spec.width)
    if spec.classifier == "linear":
        head: nn.Module = nn.Linear(dim, spec.num_classes)
        if spec.name in KAIMING_CLASSIFIER:
            nn.init.kaiming_normal_(head.weight)
    elif spec.classifier == "etf":
        head = ETFClassifier(dim, spec.num_classes, bias=spec.etf_bias, seed=spec.etf_seed)
    else:
        raise WbsweepError(f"unknown classifier '{spec.classifier}': use 'linear' or 'etf'.")
    net = Network(backbone, dim, head)
    net.spec = spec
    return net


# --- knobs that act on a built model -----------------------------------------------------------

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
WD_SCOPES = ("all", "conv_only", "no_bn_shift")


def fix_batchnorm_(model: nn.Module, scale: float) -> None:
    """"WD fixed BN": every BN scale set to one common ``scale``, every shift to 0, neither trained.

    BN modules are selected by type, never by parameter name (the authors' name matching also froze
    the 1x1 shortcut convolutions, a bug we do not copy)."""
    for m in model.modules():
        if isinstance(m, BN_TYPES) and m.affine:
            with torch.no_grad():
                m.weight.fill_(scale)
                m.bias.zero_()
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)


def weight_decay_groups(model: Network, wd: float, scope: str, conv_only_linear: bool = False) -> list[dict]:
    """SGD parameter groups for coupled L2 weight decay (the paper's eq. 4).

    scope "all": every trainable parameter decays (the paper's WD, BN scales and shifts and biases
    included). scope "conv_only" ("WD w/o BN", "WD fixed BN"): only the weights of the backbone's
    convolutions and linear layers decay; BN parameters, biases and the classifier do not (the
    paper's "applied only to convolution layers"). With ``conv_only_linear`` every linear layer's
    weight and bias decays as well, the classifier's included, i.e. everything but BN: what the
    authors' code does when BN is left out. scope "no_bn_shift" ("WD w/o shift", figure 2):
    everything decays except the BN shifts (biases of BN modules). Parameters are selected by
    module type, never by name.
    """
    if scope not in WD_SCOPES:
        raise WbsweepError(f"unknown wd_scope '{scope}': use one of {', '.join(WD_SCOPES)}.")
    decay, no_decay = [], []
    conv_only_params, bn_shifts = set(), set()
    for m in model.backbone.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            conv_only_params.add(id(m.weight))
    for m in model.modules():
        if isinstance(m, BN_TYPES) and m.bias is not None:
            bn_shifts.add(id(m.bias))
        if conv_only_linear and (isinstance(m, nn.Linear) or m is model.classifier):  # the ETF head is a linear too
            conv_only_params.update(id(p) for p in m.parameters(recurse=False))
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if scope == "all" or (scope == "conv_only" and id(p) in conv_only_params) or \
                (scope == "no_bn_shift" and id(p) not in bn_shifts):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": wd}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
