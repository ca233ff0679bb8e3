"""The network a config's (or a model file's) model section describes, with its weights and its input normalisation."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from imgpipe.core.errors import DataError
from imgpipe.learn.model_names import FACTORY_RE, torchvision_names, unknown_name
from imgpipe.learn.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZE_MODES,
    Classifier,
    check_input_size,
    factory_model,
    replace_global_pools,
    small_cnn_backbone,
    timm_backbone,
    torchvision_backbone,
)
from imgpipe.learn.weights_file import load_weights
from imgpipe.workflow import settings


def model_from_config(
    model_cfg: Mapping[str, Any],
    num_classes: int,
    in_channels: int,
    image_size: int,
    weights: str | os.PathLike | None = None,
) -> Classifier:
    """The network a model file's (or the config's) ``model`` section describes: one home for
    training (``ImageClassifier``) and inference (``imgpipe.infer.network.Network``).

    Keys a section leaves out take the schema's defaults; a model file's section comes
    complete from ``imgpipe.infer.modelfile.safe_hparams`` (which knows what older files meant).
    """
    model_cfg = settings.filled("model", model_cfg)
    return build_model(
        model_cfg["name"],
        num_classes,
        in_channels,
        image_size,
        channels=model_cfg["channels"],
        dropout=model_cfg["dropout"],
        weights=weights,
        stem=model_cfg["stem"],
    )


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    channels: Sequence[int] = (16, 32, 64),
    dropout: float = 0.3,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    stem: str = "auto",
) -> Classifier:
    """Build a classifier by name (smallcnn, torchvision, timm/<name>, package.module:factory).

    ``pretrained`` is the retired ``model.pretrained`` (hub cache), kept only so
    callers that still pass ``pretrained=False`` work: True is refused. ``stem`` is
    smallcnn's (``model.stem``: auto or none, see :func:`small_cnn_stem_stride`).
    """
    if pretrained:
        raise DataError(
            "model.pretrained is gone: set model.weights to imagenet (the library's cached "
            "pretrained weights) or to a local weights file"
        )
    if num_classes < 2:
        raise DataError(f"a classifier needs at least 2 classes, got {num_classes}")
    if name == "smallcnn":
        backbone = small_cnn_backbone(in_channels, channels, image_size, stem)
        model = Classifier(backbone, channels[-1], num_classes, dropout)
    else:
        if name.startswith("timm/"):
            net, width, head_keys = timm_backbone(name.removeprefix("timm/"), in_channels)
            model = Classifier(net, width, num_classes, dropout)
            model.head_keys = head_keys
        elif FACTORY_RE.match(name):
            model = factory_model(name, num_classes, in_channels, image_size)
        elif name in torchvision_names():
            net, width, head_keys = torchvision_backbone(name, in_channels, image_size)
            model = Classifier(net, width, num_classes, dropout)
            model.head_keys = head_keys
        else:
            raise unknown_name(name)
        # Same output; only the backward differs (deterministic on CUDA), so also in your module.
        replace_global_pools(model.backbone)
        check_input_size(model, name, in_channels, image_size)
    if weights is not None:
        load_weights(model, weights, name)
    return model


def normalisation(
    model_cfg: Mapping[str, Any],
    in_channels: int,
    data_mean: Sequence[float],
    data_std: Sequence[float],
) -> tuple[list[float], list[float]]:
    """(mean, std) the input is normalised with: ImageNet's with weights (default), else the data's.

    ``model.normalize``: ``auto`` (ImageNet statistics when ``model.weights`` is
    set, the data's otherwise), ``imagenet`` or ``data``. Grey input uses the
    mean of ImageNet's three channel statistics.
    """
    model_cfg = settings.filled("model", model_cfg)
    mode = model_cfg["normalize"]
    if mode not in NORMALIZE_MODES:
        raise DataError(f"model.normalize: {mode!r} is not one of {', '.join(NORMALIZE_MODES)}")
    if mode == "auto":
        mode = "imagenet" if model_cfg.get("weights") else "data"
    if mode == "data":
        return [float(v) for v in data_mean], [float(v) for v in data_std]
    if in_channels == len(IMAGENET_MEAN):
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    grey_mean = sum(IMAGENET_MEAN) / len(IMAGENET_MEAN)
    grey_std = sum(IMAGENET_STD) / len(IMAGENET_STD)
    return [grey_mean] * in_channels, [grey_std] * in_channels
