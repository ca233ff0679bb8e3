"""Inference with a trained checkpoint: class probabilities and embeddings, batch by batch.

Kept apart from training (no Trainer, no data module): evaluate, cluster and
the k-fold predictions import this module only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from imgpipe.classifier_module import ImageClassifier
from imgpipe.image_datamodule import to_uint8_nchw

# Anything indexable by an array of positions returning uint8 NHWC (numpy, ShardImages).
Images = Any


def load_classifier(
    checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> ImageClassifier:
    """Rebuild the ImageClassifier of a checkpoint (weights-only load: no pickled code runs)."""
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    hparams = dict(state["hyper_parameters"])
    # The trained weights come from the checkpoint: never read the pretrained file again.
    hparams["model_cfg"] = {**hparams["model_cfg"], "weights": None}
    module = ImageClassifier(**hparams)
    module.load_state_dict(state["state_dict"])
    return module.to(device).eval()


def _batched(
    checkpoint_path: str | os.PathLike,
    images: Images,
    batch_size: int,
    features: bool,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = load_classifier(checkpoint_path, device)
    ids = np.arange(len(images)) if ids is None else np.asarray(ids, dtype=np.int64)
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            pixels = to_uint8_nchw(images[ids[start : start + batch_size]])
            x = module.preprocess(pixels.to(device))
            out = module.embed(x) if features else torch.softmax(module(x), dim=1)
            outputs.append(out.float().cpu())
    if not outputs:
        width = module.model.head.in_features if features else module.model.head.out_features
        return np.zeros((0, width), dtype=np.float32)
    return torch.cat(outputs).numpy()


def predict_proba(
    checkpoint_path: str | os.PathLike,
    images: Images,
    batch_size: int = 512,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """Class probabilities (N, num_classes) of uint8 (N, S, S, C) images (or of ``images[ids]``)."""
    return _batched(checkpoint_path, images, batch_size, features=False, ids=ids)


def embed(
    checkpoint_path: str | os.PathLike,
    images: Images,
    batch_size: int = 512,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """Penultimate-layer features (N, D) of uint8 (N, S, S, C) images (or of ``images[ids]``)."""
    return _batched(checkpoint_path, images, batch_size, features=True, ids=ids)
