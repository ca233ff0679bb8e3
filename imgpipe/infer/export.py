"""Export the final model to ONNX (float and int8) and TorchScript, each self-describing.

Both files hold one graph, ``Predictor``: uint8 (or float, 0-255) NCHW images
in, class probabilities out; scaling to [0, 1], the normalisation, the
calibration temperature and the softmax are inside. What remains outside is the file preprocessing that every
imgpipe stage shares (``imgpipe.data.ingest.prepare_images``: decode, EXIF
orientation, colour mode, resize with pad or crop), described in the sidecar
with the class names, so either file is usable alone, by ``imgpipe predict``
or by any ONNX Runtime / libtorch program. The same description, precise
enough to reproduce the input with OpenCV and numpy (``preprocess_spec``), is
written as ``preprocess.json`` beside the exports and into the ONNX files'
``metadata_props``, so an ONNX file handed on alone still says what it takes.

ONNX goes through torch's TorchScript-based exporter (``dynamo=False``): the
dynamo exporter needs onnxscript, which this project does not install. The
batch axis is dynamic; the opset is recorded in the sidecar. After writing,
each export is run on a fixed random batch beside the eager model and refused
when a probability differs by more than ``PARITY_TOLERANCE``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgpipe.core.atomic import atomic_path, file_sha256, write_json
from imgpipe.core.errors import DataError
from imgpipe.infer.inference import ONNX_METADATA_PROP, SIDECAR_SUFFIX, Model, load_model
from imgpipe.infer.modelfile import METADATA_KEY
from imgpipe.learn.calibration import apply_temperature
from imgpipe.workflow.settings import section_defaults

log = logging.getLogger("imgpipe")

# export.opset's default in config/schema.yaml, for callers that export outside the workflow.
DEFAULT_OPSET = section_defaults("export")["opset"]
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 16
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
SIDECAR_FORMAT = 1
PREPROCESS_FORMAT = 1
# metadata_props keys of the ONNX files (plain strings; JSON where a value is structured).
PROP_PREPROCESS = "imgpipe.preprocess"  # preprocess.json's content
PROP_METADATA = ONNX_METADATA_PROP  # the model file's METADATA_KEY entry (what a sidecar holds)


class Predictor(nn.Module):
    """uint8 (or float in 0-255) NCHW images -> class probabilities, normalisation included.

    The very operations of ``ImageClassifier.preprocess`` (divide by 255,
    subtract the mean, divide by the std) followed by the network, the
    calibration temperature (``imgpipe.learn.calibration.apply_temperature``, baked
    into the graph as a constant) and softmax: the file alone gives calibrated
    probabilities.
    """

    def __init__(
        self, network: nn.Module, mean: torch.Tensor, std: torch.Tensor, temperature: float = 1.0
    ):
        super().__init__()
        self.network = network
        self.register_buffer("mean", mean.detach().clone().float().reshape(1, -1, 1, 1))
        self.register_buffer("std", std.detach().clone().float().reshape(1, -1, 1, 1))
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, classes) of a (N, C, S, S) batch of 0-255 pixel values."""
        x = images.float() / 255.0
        x = (x - self.mean) / self.std
        return torch.softmax(apply_temperature(self.network(x), self.temperature), dim=1)


def predictor(model: Model) -> Predictor:
    """The export graph of a checkpoint's model (CPU, eval mode), its temperature included."""
    if model.kind != "checkpoint":
        raise DataError(f"{model.path}: export starts from a model.ckpt, not a {model.kind} file")
    module = model.module.to("cpu").eval()
    return Predictor(module.model, module.mean, module.std, module.temperature).eval()


def example_batch(model: Model, n: int = PARITY_IMAGES, seed: int = 0) -> np.ndarray:
    """A fixed random uint8 (n, S, S, C) batch in the model's input shape."""
    size = int(model.image["size"])
    channels = 3 if model.image["mode"] == "rgb" else 1
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def sidecar(model: Model, runtime: str, **extra: Any) -> dict[str, Any]:
    """The JSON description of an export: input, output, preprocessing, classes, the model's metadata."""
    image = model.image
    channels = 3 if image["mode"] == "rgb" else 1
    normalisation = model.metadata.get("normalisation", {})
    return {
        "format": "imgpipe-export",
        "format_version": SIDECAR_FORMAT,
        "runtime": runtime,
        **extra,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "shape": ["batch", channels, image["size"], image["size"]],
            "range": [0, 255],
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(model.class_names)],
            "is": "softmax(logits / temperature): calibrated probabilities",
        },
        # The calibration temperature (imgpipe.learn.calibration), already inside the graph.
        "temperature": float(model.module.temperature),
        "preprocessing": {
            "steps": [
                "decode the file (EXIF orientation applied; 16-bit shifted to 8 bits; "
                "alpha composited on white; first frame of a multi-frame file)",
                f"convert to {image['mode']}",
                f"resize to {image['size']} x {image['size']} keeping the aspect ratio "
                "(OpenCV INTER_AREA to shrink, INTER_LINEAR to enlarge): "
                + (
                    "pad (letterbox with the median colour of the border)"
                    if image["fit"] == "pad"
                    else "crop (central square)"
                ),
                "channels first (NCHW), uint8",
            ],
            "reference": "imgpipe.data.ingest.prepare_images",
            "image": image,
            "normalisation_inside_model": normalisation,
        },
        "class_names": model.class_names,
        "source_checkpoint": {"path": model.path, "sha256": file_sha256(model.path)},
        METADATA_KEY: model.metadata,
    }


def _fit_rule(fit: str) -> dict[str, Any]:
    """``fit_square``'s rule in words precise enough to re-implement it (pad: the letterbox colour)."""
    scale = (
        "scale = size / max(h, w); new_w = min(size, max(1, round(w * scale))), "
        "new_h likewise (Python's round: halves to even); resize to (new_w, new_h) with "
        "cv2.INTER_AREA when scale < 1, cv2.INTER_LINEAR when scale > 1, not at all when equal"
    )
    if fit == "crop":
        return {
            "fit": "crop",
            "crop": "central square first: side = min(h, w), top = (h - side) // 2, "
            "left = (w - side) // 2",
            "resize": scale + " (after the crop h == w, so no padding)",
        }
    return {
        "fit": "pad",
        "resize": scale,
        "letterbox": {
            "when": "h != w (a square image is only resized)",
            "border_colour": "per channel, the upper median of the ORIGINAL image's outermost "
            "pixels (before resizing, after the colour conversion): the first row, the last "
            "row, then the first and last columns without their first and last pixels "
            "(np.concatenate((im[0], im[-1], im[1:-1, 0], im[1:-1, -1]))), sorted per "
            "channel, element len // 2",
            "placement": "a size x size canvas filled with the border colour; the resized "
            "image at top = (size - new_h) // 2, left = (size - new_w) // 2",
        },
    }


def preprocess_spec(model: Model) -> dict[str, Any]:
    """What a program needs to turn an image file into the exported graph's input, exactly as imgpipe does.

    Written as ``preprocess.json`` beside the exports and into the ONNX files'
    ``metadata_props``; ``docs/use_your_model.md`` re-implements it with
    OpenCV and numpy and a test checks that re-implementation's parity.
    """
    import imgpipe

    image = model.image
    channels = 3 if image["mode"] == "rgb" else 1
    normalisation = model.metadata.get("normalisation", {})
    return {
        "format": "imgpipe-preprocess",
        "format_version": PREPROCESS_FORMAT,
        "imgpipe_version": imgpipe.__version__,
        "class_names": model.class_names,
        "image": {"size": image["size"], "mode": image["mode"], "fit": image["fit"]},
        "decode": {
            "read": "cv2.imdecode(bytes, cv2.IMREAD_UNCHANGED) (PIL for formats OpenCV cannot "
            "read): BGR / BGRA channel order",
            "bit_depth": "9- to 16-bit samples shifted right by (bit depth - 8), by 8 for a "
            "16-bit file (not clipped)",
            "orientation": "EXIF orientation applied (cv2.IMREAD_UNCHANGED does not apply it)",
            "alpha": "composited on white: (colour * a + 255 * (255 - a) + 127) // 255 in integers",
            "frames": "the first frame of a multi-frame file",
        },
        "colour": (
            "gray: cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) (a grey file is kept as is)"
            if image["mode"] == "gray"
            else "rgb: cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) (a grey file: cv2.COLOR_GRAY2RGB)"
        ),
        **_fit_rule(image["fit"]),
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "uint8",
            "range": [0, 255],
            "shape": ["batch", channels, image["size"], image["size"]],
            "channels": "R, G, B" if channels == 3 else "grey",
        },
        "normalisation": {
            "inside_model": True,
            "formula": "(pixel * scale - mean[c]) / std[c], done by the exported graph: "
            "feed the uint8 pixels as they are",
            # A model file's normalisation (not the config's augment.scale): every file
            # imgpipe writes has its scale; the fallback is the only one it ever wrote.
            "scale": normalisation.get("scale", 1 / 255),
            "mean": normalisation.get("mean"),
            "std": normalisation.get("std"),
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(model.class_names)],
            "meaning": "calibrated class probabilities, softmax(logits / temperature) inside "
            "the graph; column j is class_names[j]",
            "temperature": float(model.metadata.get("temperature", 1.0)),
        },
        "reference": "imgpipe.data.ingest.prepare_images",
    }


def write_preprocess(model: Model, path: str | os.PathLike) -> dict[str, Any]:
    """Write ``preprocess.json`` (``preprocess_spec``); return it."""
    spec = preprocess_spec(model)
    write_json(spec, path)
    return spec


def onnx_props(model: Model) -> dict[str, str]:
    """The ONNX ``metadata_props`` of an export: the preprocessing and the model file's metadata as JSON."""
    import imgpipe

    spec = preprocess_spec(model)
    return {
        PROP_PREPROCESS: json.dumps(spec, sort_keys=True),
        PROP_METADATA: json.dumps(model.metadata, sort_keys=True),
        "imgpipe.version": imgpipe.__version__,
        "imgpipe.class_names": json.dumps(model.class_names),
    }


def set_onnx_props(path: str | os.PathLike, props: dict[str, str]) -> None:
    """Replace an ONNX file's ``metadata_props`` with ``props`` (the file is rewritten in place)."""
    import onnx

    proto = onnx.load(os.fspath(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, os.fspath(path))


def max_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """Largest absolute difference between two probability arrays."""
    return float(np.max(np.abs(reference.astype(np.float64) - other.astype(np.float64))))


def _check_parity(model: Model, exported: Model, what: str) -> dict[str, Any]:
    batch = example_batch(model)
    reference, found = model.probabilities(batch), exported.probabilities(batch)
    diff = max_difference(reference, found)
    agree = float(np.mean(reference.argmax(axis=1) == found.argmax(axis=1)))
    if diff > PARITY_TOLERANCE:
        raise DataError(
            f"{what} export differs from the PyTorch model by {diff:.3g} "
            f"(tolerance {PARITY_TOLERANCE:g}) on a test batch"
        )
    log.info("%s parity on %d random images: max |dp| %.3g", what, len(batch), diff)
    return {"images": len(batch), "max_abs_difference": diff, "label_agreement": agree}


def _verify(model: Model, exported_path: Path, meta: dict[str, Any], what: str) -> dict[str, Any]:
    """Load the freshly written export the way ``imgpipe predict`` will and check its parity."""
    beside = Path(f"{exported_path}{SIDECAR_SUFFIX}")
    try:
        write_json(meta, beside)
        # The file was written just now, by this very job: trusted, TorchScript included.
        exported = load_model(exported_path, device="cpu", trust_torchscript=True)
        return _check_parity(model, exported, what)
    finally:
        beside.unlink(missing_ok=True)


def export_onnx(
    model: Model, path: str | os.PathLike, opset: int = DEFAULT_OPSET
) -> dict[str, Any]:
    """Write ``path`` (ONNX, dynamic batch axis) and its sidecar ``path.json``; return the sidecar."""
    import onnx

    graph = predictor(model)
    example = _nchw(example_batch(model, n=2))
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of dynamo (needs onnxscript).
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                graph,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=int(opset),
                dynamo=False,
            )
        set_onnx_props(tmp, onnx_props(model))
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        opsets = {entry.domain or "ai.onnx": int(entry.version) for entry in proto.opset_import}
        meta = sidecar(
            model,
            "onnxruntime",
            opset=opsets.get("ai.onnx", int(opset)),
            onnx_ir_version=int(proto.ir_version),
            torch_version=torch.__version__.split("+")[0],
        )
        meta["parity"] = _verify(model, tmp, meta, "ONNX")
    write_json(meta, f"{os.fspath(path)}{SIDECAR_SUFFIX}")
    return meta


def export_torchscript(model: Model, path: str | os.PathLike) -> dict[str, Any]:
    """Write ``path`` (TorchScript, traced) and its sidecar ``path.json``; return the sidecar."""
    graph = predictor(model)
    example = _nchw(example_batch(model, n=2))
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is what
        # libtorch (C++) and older runtimes load; it still works as it did.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(graph, example)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(traced, str(tmp))
        meta = sidecar(model, "torchscript", torch_version=torch.__version__.split("+")[0])
        meta["parity"] = _verify(model, tmp, meta, "TorchScript")
    write_json(meta, f"{os.fspath(path)}{SIDECAR_SUFFIX}")
    return meta


def export_int8(
    model: Model,
    float_path: str | os.PathLike,
    path: str | os.PathLike,
    calibration: np.ndarray,
    test: HeldOutImages,
) -> dict[str, Any]:
    """Write ``path`` (int8 ONNX, static quantisation of ``float_path``) and its sidecar; return it.

    The sidecar's ``quantization.test`` holds the float and the int8 model's
    accuracy on the test images (``test``), their label agreement and largest
    probability difference: int8 is not held to the float parity tolerance.
    """
    from imgpipe.infer.quantize import compare_on_test, probabilities, quantize_int8

    float_model = load_model(float_path, device="cpu")
    with atomic_path(path) as tmp:
        how = quantize_int8(float_path, tmp, calibration, INPUT_NAME)
        set_onnx_props(tmp, {**onnx_props(model), "imgpipe.quantization": json.dumps(how)})
        meta = sidecar(model, "onnxruntime", float_model=Path(float_path).name)
        # Loaded the way imgpipe predict loads it: from its metadata_props, no sidecar yet.
        int8_model = load_model(tmp, device="cpu")
        how["test"] = compare_on_test(
            probabilities(float_model, test.images, test.ids),
            probabilities(int8_model, test.images, test.ids),
            test.labels,
        )
        meta["quantization"] = how
    write_json(meta, f"{os.fspath(path)}{SIDECAR_SUFFIX}")
    found = how["test"]
    log.info(
        "int8 on %d test images: accuracy %.4f (float %.4f), labels agree %.4f",
        found["images"],
        found["accuracy_int8"],
        found["accuracy_float"],
        found["label_agreement"],
    )
    return meta


@dataclass
class HeldOutImages:
    """The test role's images (indexable by id, uint8 NHWC), their ids and label codes (model order)."""

    images: Any
    ids: np.ndarray
    labels: np.ndarray


def role_images(
    index_csv: str, split_csv: str, class_names: list[str]
) -> tuple[Any, np.ndarray, HeldOutImages]:
    """The shards' images, the training role's ids and the test role, read as evaluate reads them."""
    from imgpipe.data.dataset import load_index, open_images
    from imgpipe.data.split import load_split, role_ids, rows_of_test_set

    index = load_index(index_csv)
    roles = load_split(split_csv)
    rows = rows_of_test_set(index, roles)
    code_of = {name: code for code, name in enumerate(class_names)}
    unknown = sorted(set(rows["label"].astype(str)) - set(code_of))
    if unknown:
        raise DataError(f"test labels {unknown[:3]} are not classes of the model: another run's?")
    labels = rows["label"].astype(str).map(code_of).to_numpy(np.int64)
    images = open_images(index)
    test = HeldOutImages(images, rows["id"].to_numpy(np.int64), labels)
    return images, role_ids(roles, "train"), test
