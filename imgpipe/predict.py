"""Inference with a trained model: arrays (evaluate, cluster, k-fold) and a model restored from its file.

Kept apart from training (no Trainer, no data module):

* arrays: ``load_classifier``, ``predict_proba`` and ``embed`` over uint8 NHWC
  arrays or the shards on disk (``imgpipe.dataset.ShardImages``), batch by batch;
* files: ``load_model(path)`` restores a ready model from its file alone (a
  ``model.ckpt``, or an exported ``model.onnx`` / ``model.pt`` with its JSON
  sidecar). Predicting folders of new image files is ``imgpipe.predict_images``.

torch, Lightning and onnxruntime are imported where they are used: an ONNX
model predicts without loading Lightning.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgpipe.errors import DataError
from imgpipe.modelfile import METADATA_KEY, checkpoint_metadata

if TYPE_CHECKING:
    import torch

    from imgpipe.classifier_module import ImageClassifier

log = logging.getLogger("imgpipe")

# Anything indexable by an array of positions returning uint8 NHWC (numpy, ShardImages).
Images = Any

# An export's sidecar suffix (its JSON holds the model file's METADATA_KEY entry).
SIDECAR_SUFFIX = ".json"
# config/schema.yaml's data.extensions default: used when a model file names none.
DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 100_000_000


# ----------------------------------------------------------------------------- arrays


def _classifier_from_state(state: Mapping[str, Any]) -> ImageClassifier:
    from imgpipe.classifier_module import ImageClassifier

    hparams = dict(state["hyper_parameters"])
    # The trained weights come from the checkpoint: never read the pretrained file again.
    hparams["model_cfg"] = {**hparams["model_cfg"], "weights": None}
    module = ImageClassifier(**hparams)
    module.load_state_dict(state["state_dict"])
    return module.eval()


def load_classifier(
    checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> ImageClassifier:
    """Rebuild the ImageClassifier of a checkpoint (weights-only load: no pickled code runs)."""
    import torch

    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    return _classifier_from_state(state).to(device).eval()


def _batched(
    checkpoint_path: str | os.PathLike,
    images: Images,
    batch_size: int,
    features: bool,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    import torch

    from imgpipe.gpus import claim_for_inference
    from imgpipe.image_datamodule import to_uint8_nchw

    ids = np.arange(len(images)) if ids is None else np.asarray(ids, dtype=np.int64)
    outputs = []
    # Holds one GPU (when there are GPUs) for the whole pass, so inference never
    # shares a device with a training job or another inference.
    with claim_for_inference() as device:
        module = load_classifier(checkpoint_path, device)
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


# ----------------------------------------------------------------------------- the model file


@dataclass
class Model:
    """A trained classifier ready to predict, and everything its file says about it.

    ``probabilities(images)`` takes uint8 (N, S, S, C) arrays as
    ``imgpipe.ingest.prepare_images`` makes them (decoded, colour mode, resized
    with the model's fit) and returns float32 (N, classes) probabilities;
    scaling and normalisation happen inside. ``kind`` is ``checkpoint``,
    ``torchscript`` or ``onnx``; ``metadata`` the file's ``imgpipe`` entry.
    """

    path: str
    kind: str
    device: str
    metadata: dict[str, Any]
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    module: Any = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (column j of the probabilities is class j)."""
        return [str(name) for name in self.metadata["class_names"]]

    @property
    def image(self) -> dict[str, Any]:
        """The image settings the model takes: size, mode (gray / rgb), fit (pad / crop)."""
        return dict(self.metadata["image"])

    @property
    def clean(self) -> dict[str, Any]:
        """The quality-check settings of clean the model was trained with ({} if the file names none)."""
        return dict(self.metadata.get("clean") or {})

    @property
    def max_pixels(self) -> int:
        """Largest image (pixels, from its header) decoded; larger files are refused as too_large."""
        return int(self.metadata.get("max_pixels") or DEFAULT_MAX_PIXELS)

    @property
    def extensions(self) -> list[str]:
        """File extensions listed for prediction (the training run's data.extensions)."""
        return list(self.metadata.get("extensions") or DEFAULT_EXTENSIONS)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) of uint8 (N, S, S, C) images."""
        images = np.asarray(images)
        expected = (self.image["size"], self.image["size"], 3 if self.image["mode"] == "rgb" else 1)
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1:] != expected:
            raise ValueError(
                f"expected uint8 images of shape (N, {', '.join(map(str, expected))}), "
                f"got {images.dtype} {images.shape}"
            )
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.asarray(self.run(images), dtype=np.float32)


def resolve_device(device: str | None) -> str:
    """``cpu`` or ``cuda``; None picks cuda when torch sees a GPU; cuda without one is a DataError."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise DataError(f"device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("device cuda: torch finds no usable CUDA device here")
    return device


def _load_checkpoint(path: str, device: str, threads: int | None) -> Model:
    import torch

    from imgpipe.image_datamodule import to_uint8_nchw

    state = torch.load(path, map_location="cpu", weights_only=True)
    if "hyper_parameters" not in state or "state_dict" not in state:
        raise DataError(f"{path}: not an imgpipe model file (no hyper_parameters / state_dict)")
    module = _classifier_from_state(state).to(device)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = module.preprocess(to_uint8_nchw(images).to(device))
            return torch.softmax(module(x).float(), dim=1).cpu().numpy()

    return Model(path, "checkpoint", device, checkpoint_metadata(state), run, module)


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON sidecar of an exported model (``<model file>.json``)."""
    sidecar = Path(f"{os.fspath(path)}{SIDECAR_SUFFIX}")
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path}: its sidecar {sidecar.name} (preprocessing and class names) is missing"
        ) from None


def _load_torchscript(path: str, device: str, threads: int | None) -> Model:
    import torch

    from imgpipe.image_datamodule import to_uint8_nchw

    sidecar = read_sidecar(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        scripted = torch.jit.load(path, map_location=device).eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return scripted(to_uint8_nchw(images).to(device)).float().cpu().numpy()

    return Model(path, "torchscript", device, dict(sidecar[METADATA_KEY]), run, scripted)


def onnx_session(path: str, device: str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime session of ``path`` on the CPU (``threads`` intra-op threads) or CUDA."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DataError(
                "device cuda: this onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu, or use --device cpu)"
            )
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(path, options, providers=providers)


def _load_onnx(path: str, device: str, threads: int | None) -> Model:
    sidecar = read_sidecar(path)
    session = onnx_session(path, device, threads)
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(images.transpose(0, 3, 1, 2))})[0]

    return Model(path, "onnx", device, dict(sidecar[METADATA_KEY]), run, session)


def load_model(
    path: str | os.PathLike, device: str | None = "cpu", threads: int | None = None
) -> Model:
    """A ready model from its file alone: ``model.ckpt``, or ``model.onnx`` / ``model.pt`` with sidecar.

    ``device``: cpu, cuda, or None for cuda when available. ``threads``: CPU
    threads of an ONNX Runtime session (torch uses ``torch.set_num_threads``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"model file {path!r} does not exist")
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        # ONNX needs no torch: only ask torch about CUDA when it is asked for.
        device = device or "cpu"
        if device not in ("cpu", "cuda"):
            raise DataError(f"device {device!r}: expected cpu or cuda")
        return _load_onnx(path, device, threads)
    device = resolve_device(device)
    if suffix == ".pt":
        return _load_torchscript(path, device, threads)
    return _load_checkpoint(path, device, threads)


# ----------------------------------------------------------------------------- listing
