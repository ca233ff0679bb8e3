"""A trained classifier for inference with torch alone: the network and its normalisation.

``ImageClassifier`` (``imgpipe.learn.classifier_module``) is the LightningModule that
trains; a model file's weights also load into :class:`Network`, which holds
the same parts under the same state-dict keys (``model.*``, ``mean``, ``std``)
and does what inference needs (normalise, logits, features) without importing
Lightning, so predicting from a ``model.ckpt`` starts quickly and lightly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from imgpipe.learn.factory import model_from_config


def to_uint8_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 array -> contiguous (N, C, H, W) uint8 tensor.

    Colour images are split into their planes by OpenCV, image by image (~6x
    faster than numpy's general transpose: 1 vs 6 ms for 128 images of 224 px).
    """
    array = np.asarray(images)
    if array.ndim != 4 or array.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {array.dtype} {array.shape}")
    n, height, width, channels = array.shape
    if channels == 1 or not array.flags.c_contiguous or not 1 < channels <= 4:
        return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
    out = np.empty((n, channels, height, width), np.uint8)
    for k in range(n):
        cv2.split(array[k], list(out[k]))
    return torch.from_numpy(out)


class HyperParameters(dict):
    """A model's hyper-parameters, read as keys or attributes (as Lightning's ``hparams``)."""

    def __getattr__(self, name: str) -> Any:
        """The value of key ``name``."""
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Network(nn.Module):
    """The classifier of a model file with its normalisation: uint8 batches in, logits out.

    Built from the file's checked hyper-parameters (those of ``ImageClassifier``,
    kept in ``hparams``);
    ``preprocess`` is ``ImageClassifier.preprocess`` without augmentation (the
    same lookup table on a CPU uint8 batch, the same float operations
    elsewhere), so both give the same bits.
    """

    def __init__(
        self,
        model_cfg: Mapping[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        **training_only: Any,
    ) -> None:
        super().__init__()
        # Every hyper-parameter of the file, as ImageClassifier.hparams shows them.
        self.hparams = HyperParameters(
            model_cfg=model_cfg,
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            mean=mean,
            std=std,
            **training_only,
        )
        # The file's own weights replace any initial ones.
        self.model = model_from_config(model_cfg, num_classes, in_channels, image_size)
        # Calibration (imgpipe.learn.calibration): logits / T become the probabilities people see.
        self.temperature = float(training_only.get("temperature", 1.0))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) NCHW batch -> normalised float batch."""
        if x.dtype == torch.uint8 and x.device.type == "cpu" and x.ndim == 4 and len(x):
            from imgpipe.images.augment import warp_uint8

            levels = torch.arange(256, dtype=torch.float32).div_(255.0)
            tables = levels.view(1, 256).sub(self.mean.view(-1, 1)).div(self.std.view(-1, 1))
            return warp_uint8(x, None, tables=tables)
        return x.to(torch.float32, copy=True).div_(255.0).sub_(self.mean).div_(self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a preprocessed batch."""
        return self.model(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of a preprocessed batch."""
        return self.model.embed(x)
