"""Image classifiers: the small CNN, any torchvision or timm classification model, or your own.

Every model is a :class:`Classifier`: ``embed(x)`` gives the penultimate features
(N, D) and ``forward(x)`` the class logits (N, num_classes). ``model.name`` picks it:

* ``smallcnn``: a configurable CNN (``model.channels``), with a strided stem from
  64 px on (``model.stem``) so it stays fast at photo sizes;
* any torchvision classification model (``resnet18``, ``efficientnet_b0``, ...), built
  without weights, its classifier (the last ``nn.Linear``) replaced by the head;
* ``timm/<name>`` (``timm/convnext_atto``, ...), built with ``num_classes=0``;
* ``package.module:factory``: your own ``factory(num_classes, in_channels, image_size)``
  returning an ``nn.Module`` whose output is the logits (see :class:`ModuleClassifier`).

Pretrained weights are only ever read from a local file (``model.weights``: a path,
or a name such as ``imagenet`` found in the library's cache by :mod:`imgpipe.learn.pretrained`, see
:func:`load_weights`); nothing is downloaded. Below 64 px the torchvision ResNet
family gets a 3x3 stride-1 stem without max-pool and VGG drops the max-pools that
would shrink the map below one pixel; at 64 px and above every torchvision model
keeps its standard layout.

No Lightning here: prediction builds these networks with torch alone. The
``train.freeze`` callback (``BackboneFreeze``) lives with the trainer, in
``imgpipe.learn.fit``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from imgpipe.core.errors import DataError
from imgpipe.learn.model_names import timm_name_error

# Below this input size the ResNet family gets the small-input stem and VGG drops pools.
SMALL_INPUT = 64
RESNET_FAMILY = ("resnet", "resnext", "wide_resnet")
# Torchvision models built without their auxiliary classifiers (they only serve training
# with the original losses); a checkpoint's keys for them are dropped like the head's.
AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}

# RGB statistics torchvision / timm ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_MODES = ("auto", "imagenet", "data")

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# Image sizes tried to find the smallest one a model runs on (besides image.size itself).
PROBE_SIZES = (8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 299, 320, 384, 448, 512, 768, 1024)


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes, (N, C, H, W) -> (N, C), or (N, C, 1, 1) with ``keepdim``.

    A plain mean instead of nn.AdaptiveAvgPool2d: its backward has a
    deterministic CUDA kernel, so ``deterministic: true`` also holds on GPUs.
    """

    def __init__(self, keepdim: bool = False):
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Average each channel over height and width."""
        return x.mean(dim=(2, 3), keepdim=self.keepdim)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a batch / instance norm layer (one that may keep running statistics)."""
    return isinstance(module, NORM_LAYERS)


class Classifier(nn.Module):
    """A feature extractor (backbone ending in pooled features) followed by dropout and a linear head.

    ``head_keys`` names the submodules of the backbone's original classifier (in
    the backbone's own key namespace, e.g. ``("fc",)`` for a torchvision ResNet):
    a weights file's tensors for them are dropped, the head being this
    dataset's. While the backbone is frozen (:func:`set_backbone_trainable`) its
    features are detached and its norm layers stay in eval mode, whatever
    ``train()`` is called with.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.head_keys: tuple[str, ...] = ()
        self.backbone_frozen = False

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, num_features)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        features = self.embed(x)
        if self.backbone_frozen:
            features = features.detach()
        return self.head(self.dropout(features))

    def train(self, mode: bool = True) -> Classifier:
        """Set training mode; a frozen backbone's norm layers stay in eval mode (statistics kept)."""
        super().train(mode)
        if mode and self.backbone_frozen:
            for module in self.backbone.modules():
                if is_norm_layer(module):
                    module.eval()
        return self


class ModuleClassifier(Classifier):
    """A module from ``model.name: package.module:factory``, whose own output is the logits.

    The module is the backbone and its last ``nn.Linear`` (in registration
    order) is taken as the head: ``head`` is that very layer (not a copy), so
    ``forward`` simply runs the module. ``embed`` calls the module's own
    ``embed`` if it has one, else returns the input of that last layer (caught
    with a forward hook). ``model.dropout`` does not apply (``dropout`` is an
    identity): the module has its own.
    """

    def __init__(self, module: nn.Module, head_name: str):
        nn.Module.__init__(self)
        self.backbone = module
        self.dropout = nn.Identity()
        self.head_name = head_name
        head = module.get_submodule(head_name)
        self.num_features = head.in_features
        self.head_keys = (head_name,)
        self.backbone_frozen = False
        head.register_forward_pre_hook(self._detach_if_frozen)

    @property
    def head(self) -> nn.Linear:
        """The module's own last nn.Linear."""
        return self.backbone.get_submodule(self.head_name)

    def _detach_if_frozen(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.backbone_frozen:
            return (args[0].detach(), *args[1:])
        return None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The module's own ``embed``, else the input of its last nn.Linear (N, num_features)."""
        own = getattr(self.backbone, "embed", None)
        if callable(own):
            return own(x)
        caught: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda m, args: caught.append(args[0]))
        try:
            self.backbone(x)
        finally:
            handle.remove()
        return caught[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: the module's own output."""
        return self.backbone(x)


# ---------------------------------------------------------------- the small CNN


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 3x3 same-padding convolution, batch norm and ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


# smallcnn's stem: ``auto`` downsamples early from SMALL_INPUT px on, ``none`` never
# (the layout of model files written before the stem existed).
SMALL_CNN_STEMS = ("auto", "none")


def small_cnn_stem_stride(image_size: int, stem: str = "auto") -> int:
    """Stride of smallcnn's stem: 1 (no stem) below 64 px or with ``none``, 2 at 64-127 px, 4 from 128."""
    if stem not in SMALL_CNN_STEMS:
        raise DataError(f"model.stem: {stem!r} is not one of {', '.join(SMALL_CNN_STEMS)}")
    if stem == "none" or image_size < SMALL_INPUT:
        return 1
    return 2 if image_size < 2 * SMALL_INPUT else 4


def strided_stem(in_channels: int, width: int, stride: int) -> list[nn.Module]:
    """(3x3 stride-2 conv-bn-relu) once per halving: the map shrinks ``stride`` times before the blocks."""
    layers: list[nn.Module] = []
    previous = in_channels
    while stride > 1:
        layers += [
            nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        previous, stride = width, stride // 2
    return layers


def small_cnn_backbone(
    in_channels: int, channels: Sequence[int], image_size: int, stem: str = "auto"
) -> nn.Sequential:
    """Blocks of (conv-bn-relu) x2 + 2x2 max-pool; pooling stops once the map is 1 pixel wide.

    From 64 px on (``stem: auto``) a strided stem comes first (see
    :func:`small_cnn_stem_stride`): at full resolution the first blocks cost most of
    the time and see only edges. Below 64 px the layers, their names and their
    initialisation order are those of the model without a stem.
    """
    layers: list[nn.Module] = []
    size = image_size
    previous = in_channels
    stride = small_cnn_stem_stride(image_size, stem)
    if stride > 1:
        layers += strided_stem(in_channels, channels[0], stride)
        previous, size = channels[0], -(-size // stride)
    for width in channels:
        layers += conv_bn_relu(previous, width) + conv_bn_relu(width, width)
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        previous = width
    layers += [GlobalAvgPool()]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- first-layer adaptation


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
    return weight.reshape(out_c, in_channels, *weight.shape[2:]).contiguous()


def first_conv(module: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first nn.Conv2d registered in ``module`` (the input layer of the usual models)."""
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            return name, child
    return None


def adapt_input_channels(module: nn.Module, in_channels: int) -> None:
    """Give an RGB model's first convolution ``in_channels`` inputs (grey: the RGB filters summed)."""
    found = first_conv(module)
    if found is None or found[1].in_channels == in_channels:
        return
    name, conv = found
    if conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1]:
        raise DataError(f"cannot adapt the first convolution {name} to {in_channels} channels")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_first_conv(conv.weight, in_channels, conv.kernel_size[0]))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    module.set_submodule(name, new)


def replace_global_pools(module: nn.Module) -> None:
    """Swap every nn.AdaptiveAvgPool2d to 1x1 for a plain mean (deterministic backward on CUDA)."""
    for name, child in list(module.named_modules()):
        if name and type(child) is nn.AdaptiveAvgPool2d and child.output_size in (1, (1, 1)):
            module.set_submodule(name, GlobalAvgPool(keepdim=True))


# ---------------------------------------------------------------- torchvision models


def strip_last_linear(net: nn.Module, name: str) -> tuple[str, int]:
    """Replace the model's last nn.Linear (its classifier) by an identity; its path and in_features."""
    linears = [(path, m) for path, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DataError(
            f"model.name: {name} has no final nn.Linear classifier to replace (e.g. squeezenet's "
            "is a convolution): choose another model, or wrap it in a package.module:factory"
        )
    path, linear = linears[-1]
    if linear.out_features != 1000:
        raise DataError(
            f"model.name: {name}'s last nn.Linear ({path}) has {linear.out_features} outputs, "
            "not the 1000 ImageNet classes: it is not the classifier, cannot replace it"
        )
    net.set_submodule(path, nn.Identity())
    return path, linear.in_features


class SmallInputVGG(nn.Module):
    """A torchvision VGG's convolutional part (``features``) with global average pooling.

    Below 64 px VGG's 4096-wide classifier (meant for 7x7 maps of 224 px
    inputs) would see a 1-pixel map copied 49 times: it is left out (a weights
    file's ``classifier.*`` keys are dropped) and the 512 pooled features feed the head.
    """

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features
        self.pool = GlobalAvgPool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled convolutional features (N, 512)."""
        return self.pool(self.features(x))


VGG_CONFIGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def init_like_vgg(features: nn.Module) -> None:
    """torchvision VGG's initialisation: Kaiming-normal (fan-out) convolutions, unit batch norms."""
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def small_input_vgg(name: str, image_size: int) -> SmallInputVGG:
    """VGG's convolutional part; max-pools that would shrink the map below 1 px become identities."""
    # Only the convolutional part: building the 120M-parameter classifier just to drop it is slow.
    base = name.removesuffix("_bn")
    features = tvm.vgg.make_layers(tvm.vgg.cfgs[VGG_CONFIGS[base]], batch_norm=name.endswith("_bn"))
    init_like_vgg(features)
    size = image_size
    for i, layer in enumerate(features):
        if isinstance(layer, nn.MaxPool2d):
            if size >= 2:
                size //= 2
            else:
                features[i] = nn.Identity()
    return SmallInputVGG(features)


def small_input_resnet(net: tvm.ResNet) -> None:
    """A 3x3 stride-1 stem and no max-pool (inputs below 64 px keep their detail)."""
    conv = net.conv1
    stem = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    net.conv1 = stem
    net.maxpool = nn.Identity()


def torchvision_backbone(
    name: str, in_channels: int, image_size: int
) -> tuple[nn.Module, int, tuple[str, ...]]:
    """A torchvision model without its classifier: (backbone, feature width, head keys)."""
    small = image_size < SMALL_INPUT
    if small and name.removesuffix("_bn") in VGG_CONFIGS:
        net: nn.Module = small_input_vgg(name, image_size)
        width, head_keys = 512, ("classifier",)
    else:
        kwargs: dict[str, Any] = {}
        if name in AUX_HEADS:
            kwargs = {"aux_logits": False, "init_weights": True}
        if name.startswith(RESNET_FAMILY):
            # Each residual block starts as the identity (its last batch-norm scale 0), as
            # timm's ResNets do by default (``zero_init_last``; Goyal et al. 2017). From
            # scratch at the recipe's learning rate on a few hundred images, torchvision's
            # default init made the eval-mode (running-statistics) validation loss jump
            # 2.6 -> 142 in the second epoch; see bench/recipe.py. Weights loaded later
            # (model.weights) overwrite these scales.
            kwargs["zero_init_residual"] = True
        net = tvm.get_model(name, weights=None, **kwargs)
        path, width = strip_last_linear(net, name)
        head_keys = (path, *AUX_HEADS.get(name, ()))
        if small and name.startswith(RESNET_FAMILY):
            small_input_resnet(net)
    adapt_input_channels(net, in_channels)
    return net, width, head_keys


# ---------------------------------------------------------------- timm and factories


def timm_backbone(name: str, in_channels: int) -> tuple[nn.Module, int, tuple[str, ...]]:
    """``timm/<name>`` built without classifier: (backbone, feature width, head keys)."""
    import timm

    error = timm_name_error(name)
    if error is not None:
        raise error
    net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    width = int(getattr(net, "head_hidden_size", None) or net.num_features)
    classifier = net.pretrained_cfg.get("classifier") or ()
    head_keys = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return net, width, head_keys


def factory_model(name: str, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """Import ``package.module:factory``, call it and wrap the module it returns."""
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise DataError(f"model.name: cannot import {name} ({err})") from err
    net = factory(num_classes, in_channels, image_size)
    if not isinstance(net, nn.Module):
        raise DataError(f"model.name: {name} returned {type(net).__name__}, not an nn.Module")
    linears = [path for path, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DataError(
            f"model.name: {name}'s module has no nn.Linear: its last nn.Linear is taken as the "
            "classification head"
        )
    head = net.get_submodule(linears[-1])
    if head.out_features != num_classes:
        raise DataError(
            f"model.name: {name}'s last nn.Linear ({linears[-1] or 'the module'}) has "
            f"{head.out_features} outputs but the data has {num_classes} classes (it is taken "
            "as the classification head)"
        )
    return ModuleClassifier(net, linears[-1])


# ---------------------------------------------------------------- building


def _forward_error(model: Classifier, in_channels: int, size: int) -> str | None:
    """None if the model runs on one (in_channels, size, size) image, else the error's text."""
    x = torch.zeros(1, in_channels, size, size)
    try:
        with torch.no_grad():
            logits, features = model(x), model.embed(x)
    except Exception as err:  # noqa: BLE001 - any failure means: not at this size
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    expected = (1, model.head.out_features), (1, model.num_features)
    if (tuple(logits.shape), tuple(features.shape)) != expected:
        raise DataError(
            f"model.name: the model gives logits {tuple(logits.shape)} and features "
            f"{tuple(features.shape)} for one image, expected {expected[0]} and {expected[1]}"
        )
    return None


def check_input_size(model: Classifier, name: str, in_channels: int, image_size: int) -> None:
    """Run one dummy image; if the model cannot take image.size, say the smallest size it takes."""
    was_training = model.training
    model.eval()
    try:
        error = _forward_error(model, in_channels, image_size)
        if error is None:
            return
        # Sizes are tried upwards; between the last failure and the first success, bisect.
        failed, works = image_size, None
        for size in (s for s in PROBE_SIZES if s > image_size):
            if _forward_error(model, in_channels, size) is None:
                works = size
                break
            failed = size
        if works is None:
            raise DataError(
                f"model.name: {name} does not run on image.size {image_size} px inputs ({error}), "
                f"nor on any size up to {PROBE_SIZES[-1]} px"
            )
        while works - failed > 1:
            middle = (failed + works) // 2
            if _forward_error(model, in_channels, middle) is None:
                works = middle
            else:
                failed = middle
        raise DataError(
            f"model.name: {name} does not run on image.size {image_size} px inputs ({error}); "
            f"the smallest size that works is {works} px: raise image.size or pick another model"
        )
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- weights files


# ---------------------------------------------------------------- normalisation


# ---------------------------------------------------------------- freezing and learning rates
