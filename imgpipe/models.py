"""Image classifiers for small inputs: a configurable CNN and adapted torchvision ResNet18 / VGG11-BN.

Every model is a :class:`Classifier`: ``embed(x)`` gives the penultimate features
(N, D) and ``forward(x)`` the class logits (N, num_classes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from imgpipe.errors import DataError

MODEL_NAMES = ("smallcnn", "resnet18", "vgg11_bn")

# Weights torchvision would download; we only ever read them from the local hub cache.
PRETRAINED_WEIGHTS = {
    "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
    "vgg11_bn": tvm.VGG11_BN_Weights.IMAGENET1K_V1,
}


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes, (N, C, H, W) -> (N, C).

    A plain mean instead of nn.AdaptiveAvgPool2d: its backward has a
    deterministic CUDA kernel, so ``deterministic: true`` also holds on GPUs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Average each channel over height and width."""
        return x.mean(dim=(2, 3))


class Classifier(nn.Module):
    """A feature extractor (backbone ending in pooled features) followed by dropout and a linear head."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, num_features)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.dropout(self.embed(x)))


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 3x3 same-padding convolution, batch norm and ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def small_cnn_backbone(in_channels: int, channels: Sequence[int], image_size: int) -> nn.Sequential:
    """Blocks of (conv-bn-relu) x2 + 2x2 max-pool; pooling stops once the map is 1 pixel wide."""
    layers: list[nn.Module] = []
    size = image_size
    previous = in_channels
    for width in channels:
        layers += conv_bn_relu(previous, width) + conv_bn_relu(width, width)
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        previous = width
    layers += [GlobalAvgPool()]
    return nn.Sequential(*layers)


def hub_checkpoint(name: str) -> Path:
    """The path torchvision's weights for ``name`` have in the local torch hub cache."""
    url = PRETRAINED_WEIGHTS[name].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_cached_weights(name: str) -> dict[str, torch.Tensor]:
    """Read torchvision's pretrained state dict from the hub cache; never download it."""
    if name not in PRETRAINED_WEIGHTS:
        raise DataError(f"model.pretrained: no pretrained weights exist for model {name!r}")
    path = hub_checkpoint(name)
    if not path.is_file():
        raise DataError(
            f"model.pretrained: weights for {name} not found at {path} (nothing is downloaded: "
            "copy the file there, or set model.pretrained: false)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def area_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src) matrix splitting each of ``src`` unit cells over ``dst`` equal bins by overlap."""
    edges = torch.arange(dst + 1, dtype=torch.float64) * (src / dst)
    cells = torch.arange(src, dtype=torch.float64)
    overlap = torch.minimum(edges[1:, None], cells[None, :] + 1) - torch.maximum(
        edges[:-1, None], cells[None, :]
    )
    return overlap.clamp(min=0)


def adapt_first_conv(weight: torch.Tensor, in_channels: int, kernel_size: int) -> torch.Tensor:
    """Fit pretrained RGB first-layer filters to ``in_channels`` and a smaller kernel.

    Grey input sums the RGB filters (a grey pixel is R=G=B); other channel
    counts repeat and rescale them. The kernel is area-resampled so each
    filter keeps its total weight, i.e. its response to a flat patch.
    """
    out_c, rgb, k, _ = weight.shape
    if in_channels == 1:
        weight = weight.sum(dim=1, keepdim=True)
    elif in_channels != rgb:
        repeats = -(-in_channels // rgb)
        weight = weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (rgb / in_channels)
    if k != kernel_size:
        area = area_matrix(k, kernel_size).to(weight.dtype)
        weight = area @ weight @ area.T
    return weight.reshape(out_c, in_channels, kernel_size, kernel_size).contiguous()


def resnet18_backbone(in_channels: int, pretrained: bool) -> tuple[nn.Module, int]:
    """ResNet18 with a 3x3 stride-1 stem and no initial max-pool (for inputs of 8-64 px)."""
    net = tvm.resnet18(weights=None)
    if pretrained:
        net.load_state_dict(load_cached_weights("resnet18"))
    stem = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    if pretrained:
        with torch.no_grad():
            stem.weight.copy_(adapt_first_conv(net.conv1.weight, in_channels, 3))
    backbone = nn.Sequential(
        stem, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4, GlobalAvgPool()
    )
    return backbone, net.fc.in_features


def init_like_vgg(features: nn.Module) -> None:
    """torchvision VGG's initialisation: Kaiming-normal (fan-out) convolutions, unit batch norms."""
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def vgg11_bn_backbone(in_channels: int, image_size: int, pretrained: bool) -> tuple[nn.Module, int]:
    """VGG11-BN's convolutional part; max-pools that would shrink the map below 1 px are dropped."""
    # Only VGG's convolutional part: building its 120M-parameter classifier just to drop it is slow.
    features = tvm.vgg.make_layers(tvm.vgg.cfgs["A"], batch_norm=True)
    if pretrained:
        state = load_cached_weights("vgg11_bn")
        features.load_state_dict(
            {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        )
    else:
        init_like_vgg(features)
    layers = list(features)
    first = layers[0]
    if in_channels != first.in_channels:
        conv = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
        if pretrained:
            with torch.no_grad():
                conv.weight.copy_(adapt_first_conv(first.weight, in_channels, 3))
                conv.bias.copy_(first.bias)
        layers[0] = conv
    size = image_size
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.MaxPool2d):
            if size >= 2:
                size //= 2
            else:
                layers[i] = nn.Identity()
    # VGG's 4096-wide classifier is meant for 7x7 maps of 224 px inputs: replaced by the head.
    return nn.Sequential(*layers, GlobalAvgPool()), 512


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    channels: Sequence[int] = (32, 64, 128),
    dropout: float = 0.3,
    pretrained: bool = False,
) -> Classifier:
    """Build a classifier by name: smallcnn, resnet18 or vgg11_bn (adapted to small inputs)."""
    if num_classes < 2:
        raise DataError(f"a classifier needs at least 2 classes, got {num_classes}")
    if name == "smallcnn":
        if pretrained:
            raise DataError("model.pretrained: no pretrained weights exist for model 'smallcnn'")
        backbone, width = small_cnn_backbone(in_channels, channels, image_size), channels[-1]
    elif name == "resnet18":
        backbone, width = resnet18_backbone(in_channels, pretrained)
    elif name == "vgg11_bn":
        backbone, width = vgg11_bn_backbone(in_channels, image_size, pretrained)
    else:
        raise ValueError(
            f"model.name: unknown model {name!r} (choose from {', '.join(MODEL_NAMES)})"
        )
    return Classifier(backbone, width, num_classes, dropout)
