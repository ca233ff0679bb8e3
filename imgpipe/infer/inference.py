"""Inference with a trained model: arrays (evaluate, cluster, k-fold) and a model restored from its file.

Kept apart from training (no Trainer, no data module):

* arrays: ``load_classifier``, ``predict_proba`` and ``embed`` over uint8 NHWC
  arrays or the shards on disk (``imgpipe.data.dataset.ShardImages``), batch by batch;
* files: ``load_model(path)`` restores a ready model from its file alone (a
  ``model.ckpt``, or an exported ``model.onnx`` / ``model.pt`` with its JSON
  sidecar; an ONNX file without one, from its ``metadata_props``). Predicting
  folders of new image files is ``imgpipe.stages.predict``.

torch and onnxruntime are imported where they are used, and Lightning never:
a checkpoint loads into ``imgpipe.infer.network.Network`` (torch and imgpipe's model
code), an ONNX file into onnxruntime alone.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgpipe.core.errors import DataError
from imgpipe.infer.modelfile import METADATA_KEY, TORCHSCRIPT_NOTE, checked_metadata
from imgpipe.workflow.settings import section_defaults

if TYPE_CHECKING:
    import torch

    from imgpipe.infer.network import Network

log = logging.getLogger("imgpipe")

# Anything indexable by an array of positions returning uint8 NHWC (numpy, ShardImages).
Images = Any

# An export's sidecar suffix (its JSON holds the model file's METADATA_KEY entry).
SIDECAR_SUFFIX = ".json"


# ----------------------------------------------------------------------------- arrays


# The factory (or factories) a caller names at load time for a model built by
# ``package.module:factory``: the file's own name is never enough.
Factories = str | Iterable[str] | None


def _classifier_from_state(
    state: Any, model_factory: Factories = None
) -> tuple[Network, dict[str, Any]]:
    """The checked checkpoint's Network (eval mode, on the CPU) and its metadata.

    Every field is checked (``imgpipe.infer.modelfile.validate_model_file``) before
    anything is built; the state dict must fit the architecture exactly.
    """
    from imgpipe.infer.modelfile import validate_model_file
    from imgpipe.infer.network import Network

    hparams, weights, metadata = validate_model_file(state, model_factory)
    module = Network(**hparams)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [
        f"{key} {tuple(weights[key].shape)} (model {tuple(value.shape)})"
        for key, value in expected.items()
        if key in weights and weights[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        found = [
            f"{what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''} ({len(keys)})"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("other shape", mismatched),
            )
            if keys
        ]
        raise DataError(
            f"its tensors do not fit the {hparams['model_cfg']['name']} it describes: "
            + "; ".join(found)
        )
    module.load_state_dict(weights, strict=True)
    return module.eval(), metadata


def _checkpoint_classifier(
    path: str | os.PathLike, model_factory: Factories
) -> tuple[Network, dict[str, Any]]:
    """Read, check and build a checkpoint; any refusal is one DataError line naming the file."""
    from imgpipe.infer.modelfile import read_checkpoint

    try:
        return _classifier_from_state(read_checkpoint(path), model_factory)
    except DataError as err:
        raise DataError(f"{os.fspath(path)}: {err}") from None


def load_classifier(
    checkpoint_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    model_factory: Factories = None,
) -> Network:
    """Rebuild the Network of a checkpoint: weights-only load, every field checked first.

    ``model_factory``: the ``package.module:factory`` (or several) the caller
    trusts, for a model built by one; a name in the file alone is never run.
    """
    return _checkpoint_classifier(checkpoint_path, model_factory)[0].to(device).eval()


def probabilities_of(module: Network, x: torch.Tensor) -> torch.Tensor:
    """Calibrated class probabilities of a preprocessed batch: softmax(logits / the model's T)."""
    import torch

    from imgpipe.learn.calibration import apply_temperature

    return torch.softmax(apply_temperature(module(x).float(), module.temperature), dim=1)


def _batched(
    checkpoint_path: str | os.PathLike,
    images: Images,
    batch_size: int,
    features: bool,
    ids: np.ndarray | None = None,
    model_factory: Factories = None,
    logits: bool = False,
) -> np.ndarray:
    import torch

    from imgpipe.infer.network import to_uint8_nchw
    from imgpipe.learn.gpus import claim_for_inference

    ids = np.arange(len(images)) if ids is None else np.asarray(ids, dtype=np.int64)
    outputs = []
    # Holds one GPU (when there are GPUs) for the whole pass, so inference never
    # shares a device with a training job or another inference.
    with claim_for_inference() as device:
        module = load_classifier(checkpoint_path, device, model_factory)
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                pixels = to_uint8_nchw(images[ids[start : start + batch_size]])
                x = module.preprocess(pixels.to(device))
                if features:
                    out = module.embed(x)
                else:
                    out = module(x) if logits else probabilities_of(module, x)
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
    model_factory: Factories = None,
) -> np.ndarray:
    """Calibrated class probabilities (N, num_classes) of uint8 (N, S, S, C) images (or of ``images[ids]``)."""
    return _batched(checkpoint_path, images, batch_size, False, ids, model_factory)


def predict_logits(
    checkpoint_path: str | os.PathLike,
    images: Images,
    batch_size: int = 512,
    ids: np.ndarray | None = None,
    model_factory: Factories = None,
) -> np.ndarray:
    """Raw class logits (N, num_classes), before the temperature, of uint8 images (or ``images[ids]``)."""
    return _batched(checkpoint_path, images, batch_size, False, ids, model_factory, logits=True)


def embed(
    checkpoint_path: str | os.PathLike,
    images: Images,
    batch_size: int = 512,
    ids: np.ndarray | None = None,
    model_factory: Factories = None,
) -> np.ndarray:
    """Penultimate-layer features (N, D) of uint8 (N, S, S, C) images (or of ``images[ids]``)."""
    return _batched(checkpoint_path, images, batch_size, True, ids, model_factory)


# ----------------------------------------------------------------------------- the model file


@dataclass
class Model:
    """A trained classifier ready to predict, and everything its file says about it.

    ``probabilities(images)`` and ``logits(images)`` take uint8 (N, S, S, C)
    arrays as ``imgpipe.data.ingest.prepare_images`` makes them (decoded, colour
    mode, resized with the model's fit) and return float32 (N, classes) arrays;
    scaling and normalisation happen inside. ``kind`` is ``checkpoint``,
    ``torchscript`` or ``onnx``; ``metadata`` the file's ``imgpipe`` entry.
    """

    path: str
    kind: str
    device: str
    metadata: dict[str, Any]
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    module: Any = field(default=None, repr=False)
    # What ``run`` returns: the network's "logits" (a checkpoint) or "probabilities"
    # (an exported graph, which ends in the softmax).
    outputs: str = "probabilities"

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
        # A model file older than max_pixels in its metadata: the schema's ingest.max_pixels.
        return int(self.metadata.get("max_pixels") or section_defaults("ingest")["max_pixels"])

    @property
    def extensions(self) -> list[str]:
        """File extensions listed for prediction (the training run's data.extensions)."""
        # A model file older than extensions in its metadata: the schema's data.extensions.
        return list(self.metadata.get("extensions") or section_defaults("data")["extensions"])

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Class logits (N, classes) of uint8 (N, S, S, C) images.

        A checkpoint gives its network's logits divided by the model's
        temperature (calibrated logits). An exported file's graph ends in the
        softmax of those, so its logits are the log-probabilities: the
        calibrated logits less a per-image constant, with the same softmax and order.
        """
        images = np.asarray(images)
        expected = (self.image["size"], self.image["size"], 3 if self.image["mode"] == "rgb" else 1)
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1:] != expected:
            raise ValueError(
                f"expected uint8 images of shape (N, {', '.join(map(str, expected))}), "
                f"got {images.dtype} {images.shape}"
            )
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        found = np.asarray(self.run(images), dtype=np.float32)
        if self.outputs == "probabilities":
            # A probability that underflowed to 0 stays finite: log of the smallest float32.
            return np.log(np.maximum(found, np.finfo(np.float32).tiny))
        return found

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) of uint8 (N, S, S, C) images."""
        return scores_from_logits(self.logits(images), "prob")


OUTPUT_TYPES = ("prob", "logit")


def scores_from_logits(logits: np.ndarray, output_type: str = "prob") -> np.ndarray:
    """The one logits -> output step of prediction: ``prob`` (softmax) or ``logit`` (as given).

    Every probability imgpipe reports from a model file (predictions, their
    montage and metrics, export parity) goes through here.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if output_type == "logit":
        return logits
    if output_type != "prob":
        raise DataError(f"output type {output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
    if logits.size == 0:
        return logits.copy()
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def parse_device(device: str) -> tuple[str, int | None]:
    """``cpu``, ``cuda`` or ``cuda:N`` as (kind, N or None); anything else is a DataError."""
    kind, colon, number = str(device).strip().lower().partition(":")
    if kind == "cpu" and not colon:
        return "cpu", None
    if kind == "cuda" and (not colon or number.isdigit()):
        return "cuda", int(number) if colon else None
    raise DataError(f"device {device!r}: expected cpu, cuda or cuda:N (N a GPU number)")


def resolve_device(device: str | None) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; None picks cuda when torch sees a GPU; an absent GPU is a DataError."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, index = parse_device(device)
    if kind == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise DataError(f"device {device}: torch finds no usable CUDA device here")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DataError(
            f"device {device}: torch sees {count} CUDA device(s), numbered 0 to {count - 1}"
        )
    return "cuda" if index is None else f"cuda:{index}"


def _load_checkpoint(path: str, device: str, model_factory: Factories) -> Model:
    import torch

    from imgpipe.infer.network import to_uint8_nchw
    from imgpipe.learn.calibration import apply_temperature

    module, metadata = _checkpoint_classifier(path, model_factory)
    module = module.to(device)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = module.preprocess(to_uint8_nchw(images).to(device))
            # The calibrated logits (logits / T): their softmax is the calibrated probabilities.
            return apply_temperature(module(x).float(), module.temperature).cpu().numpy()

    return Model(path, "checkpoint", device, metadata, run, module, outputs="logits")


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON sidecar of an exported model (``<model file>.json``), its ``imgpipe`` entry checked."""
    sidecar = Path(f"{os.fspath(path)}{SIDECAR_SUFFIX}")
    try:
        found = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path}: its sidecar {sidecar.name} (preprocessing and class names) is missing"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: its sidecar {sidecar.name} is no JSON file ({err})") from None
    if not isinstance(found, dict) or METADATA_KEY not in found:
        raise DataError(f"{path}: its sidecar {sidecar.name} has no {METADATA_KEY!r} entry")
    try:
        found[METADATA_KEY] = checked_metadata(
            found[METADATA_KEY], f"{sidecar.name}: {METADATA_KEY}"
        )
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    return found


def _load_torchscript(path: str, device: str, trust_torchscript: bool) -> Model:
    import torch

    from imgpipe.infer.network import to_uint8_nchw

    if not trust_torchscript:
        raise DataError(f"{path}: refused: {TORCHSCRIPT_NOTE}")
    sidecar = read_sidecar(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            scripted = torch.jit.load(path, map_location=device).eval()
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"{path}: cannot be read as a TorchScript file ({type(err).__name__}: {first[:80]})"
        ) from None

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return scripted(to_uint8_nchw(images).to(device)).float().cpu().numpy()

    return Model(path, "torchscript", device, dict(sidecar[METADATA_KEY]), run, scripted)


def onnx_session(path: str, device: str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime session of ``path`` on the CPU (``threads`` intra-op threads) or CUDA (``cuda:N``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    providers: list[Any] = ["CPUExecutionProvider"]
    kind, index = parse_device(device)
    if kind == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DataError(
                f"device {device}: this onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu, or use --device cpu)"
            )
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index or 0}))
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"{path}: cannot be read as an ONNX model ({type(err).__name__}: {first[:120]})"
        ) from None


def check_onnx_shapes(path: str, session: Any, metadata: Mapping[str, Any]) -> None:
    """The ONNX graph takes (N, C, S, S) images and gives (N, classes), as its sidecar says."""
    image = metadata["image"]
    channels = 3 if image["mode"] == "rgb" else 1
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want_in = [channels, image["size"], image["size"]]
    want_out = [len(metadata["class_names"])]
    got_in = list(inputs[0].shape[1:]) if len(inputs) == 1 else None
    got_out = list(outputs[0].shape[1:]) if len(outputs) == 1 else None
    if (
        got_in is None
        or len(inputs[0].shape) != 4
        or any(isinstance(g, int) and g != w for g, w in zip(got_in, want_in, strict=True))
    ):
        shapes = [list(i.shape) for i in inputs]
        raise DataError(
            f"{path}: the ONNX graph takes {shapes}, its sidecar says one input "
            f"[batch, {', '.join(map(str, want_in))}]"
        )
    if (
        got_out is None
        or len(got_out) != 1
        or (isinstance(got_out[0], int) and got_out != want_out)
    ):
        shapes = [list(o.shape) for o in outputs]
        raise DataError(
            f"{path}: the ONNX graph gives {shapes}, its sidecar names {want_out[0]} classes"
        )


# The ONNX metadata_props entry holding what a sidecar's METADATA_KEY entry holds
# (imgpipe.infer.export writes it), read when an .onnx file travels without its sidecar.
ONNX_METADATA_PROP = "imgpipe.metadata"


def onnx_props_metadata(path: str, session: Any) -> dict[str, Any]:
    """The model metadata an ONNX file carries in its ``metadata_props`` (for a file without sidecar)."""
    props = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA_PROP not in props:
        raise DataError(
            f"{path}: its sidecar {Path(path).name}{SIDECAR_SUFFIX} (preprocessing and class "
            f"names) is missing, and the file has no {ONNX_METADATA_PROP!r} metadata_props entry"
        )
    try:
        found = json.loads(props[ONNX_METADATA_PROP])
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: metadata_props {ONNX_METADATA_PROP!r} is no JSON ({err})"
        ) from None
    try:
        return checked_metadata(found, f"metadata_props {ONNX_METADATA_PROP}")
    except DataError as err:
        raise DataError(f"{path}: {err}") from None


def _load_onnx(path: str, device: str, threads: int | None) -> Model:
    if Path(f"{path}{SIDECAR_SUFFIX}").exists():
        metadata = dict(read_sidecar(path)[METADATA_KEY])
        session = onnx_session(path, device, threads)
    else:  # an exported file handed on alone describes itself
        session = onnx_session(path, device, threads)
        metadata = onnx_props_metadata(path, session)
    check_onnx_shapes(path, session, metadata)
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(images.transpose(0, 3, 1, 2))})[0]

    return Model(path, "onnx", device, metadata, run, session)


def load_model(
    path: str | os.PathLike,
    device: str | None = "cpu",
    threads: int | None = None,
    model_factory: Factories = None,
    trust_torchscript: bool = False,
) -> Model:
    """A ready model from its file alone: ``model.ckpt``, or ``model.onnx`` / ``model.pt`` with sidecar.

    ``device``: cpu, cuda, cuda:N, or None for cuda when available. ``threads``: CPU
    threads of an ONNX Runtime session (torch uses ``torch.set_num_threads``).
    Nothing a file names is imported or run: a checkpoint whose model was built
    by ``package.module:factory`` loads only when ``model_factory`` names that
    factory; a TorchScript file (a program) only with ``trust_torchscript``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"model file {path!r} does not exist")
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        # ONNX needs no torch: only ask torch about CUDA when it is asked for.
        device = device or "cpu"
        parse_device(device)
        return _load_onnx(path, device, threads)
    device = resolve_device(device)
    if suffix == ".pt":
        return _load_torchscript(path, device, trust_torchscript)
    return _load_checkpoint(path, device, model_factory)


# ----------------------------------------------------------------------------- listing
