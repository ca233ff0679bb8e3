"""The model file's description of itself: what ``results/train/final/model.ckpt`` says about the model.

Written by training (``model_metadata``) and completed by the final model's job
(test metrics, the quality checks and file types prediction applies); read by
``imgpipe.predict.load_model`` and the exports' sidecars. Plain types only, so
the checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from imgpipe.atomic import plain

METADATA_KEY = "imgpipe"
METADATA_FORMAT = 1


def config_hash(hparams: Mapping[str, Any]) -> str:
    """sha256 of the settings a model was trained with: its model, train, augment and image sections."""
    sections = {
        "model": hparams.get("model_cfg"),
        "train": hparams.get("train_cfg"),
        "augment": hparams.get("augment_cfg"),
        "image": hparams.get("image_cfg"),
    }
    text = json.dumps(plain(sections), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_metadata(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """What a model file says about itself: version, config hash, architecture, classes, input.

    Class names in label order, the image settings (size, mode, fit), the
    normalisation and the architecture with its arguments: enough to use the
    file alone (``imgpipe.predict.load_model``). ``run_train_final`` adds the
    clean settings and the test metrics of the final model.
    """
    import torch

    import imgpipe

    model_cfg = dict(hparams.get("model_cfg") or {})
    num_classes = int(hparams["num_classes"])
    names = hparams.get("class_names")
    image_cfg = dict(hparams.get("image_cfg") or {})
    channels = int(hparams["in_channels"])
    return plain(
        {
            "format": METADATA_FORMAT,
            "imgpipe_version": imgpipe.__version__,
            "torch_version": torch.__version__.split("+")[0],
            "config_sha256": config_hash(hparams),
            "architecture": {
                "name": model_cfg.get("name"),
                "num_classes": num_classes,
                "in_channels": channels,
                "image_size": int(hparams["image_size"]),
                "channels": model_cfg.get("channels"),
                "dropout": model_cfg.get("dropout"),
                "weights": model_cfg.get("weights"),
            },
            "class_names": list(names) if names else [str(c) for c in range(num_classes)],
            "image": {
                "size": int(image_cfg.get("size", hparams["image_size"])),
                "mode": image_cfg.get("mode", "rgb" if channels == 3 else "gray"),
                "fit": image_cfg.get("fit", "pad"),
            },
            "normalisation": {
                "scale": 1 / 255,
                "mean": [float(v) for v in hparams["mean"]],
                "std": [float(v) for v in hparams["std"]],
            },
        }
    )


def checkpoint_metadata(state: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``imgpipe`` entry; for a file written before it existed, what its hyper-parameters say."""
    if state.get(METADATA_KEY):
        return dict(state[METADATA_KEY])
    return model_metadata(state["hyper_parameters"])


# The clean settings prediction applies: the per-image quality checks (duplicates,
# label conflicts and class sizes concern a training set, not new images).
QUALITY_KEYS = ("min_side", "max_aspect", "low_information", "dark", "bright", "blur")
