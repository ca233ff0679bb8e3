"""Export the final model to ONNX and TorchScript, each with a JSON sidecar that describes it.

Both files hold one graph, ``Predictor``: uint8 (or float, 0-255) NCHW images
in, class probabilities out; scaling to [0, 1], the normalisation, the
calibration temperature and the softmax are inside. What remains outside is the file preprocessing that every
imgpipe stage shares (``imgpipe.ingest.prepare_images``: decode, EXIF
orientation, colour mode, resize with pad or crop), described in the sidecar
with the class names, so either file is usable alone, by ``imgpipe predict``
or by any ONNX Runtime / libtorch program.

ONNX goes through torch's TorchScript-based exporter (``dynamo=False``): the
dynamo exporter needs onnxscript, which this project does not install. The
batch axis is dynamic; the opset is recorded in the sidecar. After writing,
each export is run on a fixed random batch beside the eager model and refused
when a probability differs by more than ``PARITY_TOLERANCE``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgpipe.atomic import atomic_path, write_json
from imgpipe.calibration import apply_temperature
from imgpipe.errors import DataError
from imgpipe.modelfile import METADATA_KEY, configured_factories
from imgpipe.predict import SIDECAR_SUFFIX, Model, load_model
from imgpipe.stage import StageJob

log = logging.getLogger("imgpipe")

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 16
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
SIDECAR_FORMAT = 1


class Predictor(nn.Module):
    """uint8 (or float in 0-255) NCHW images -> class probabilities, normalisation included.

    The very operations of ``ImageClassifier.preprocess`` (divide by 255,
    subtract the mean, divide by the std) followed by the network, the
    calibration temperature (``imgpipe.calibration.apply_temperature``, baked
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


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        # The calibration temperature (imgpipe.calibration), already inside the graph.
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
            "reference": "imgpipe.ingest.prepare_images",
            "image": image,
            "normalisation_inside_model": normalisation,
        },
        "class_names": model.class_names,
        "source_checkpoint": {"path": model.path, "sha256": file_sha256(model.path)},
        METADATA_KEY: model.metadata,
    }


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


def run_export(job: StageJob) -> dict[str, Any]:
    """The export stage: results/export/model.onnx and model.pt, each with its JSON sidecar."""
    torch.set_num_threads(max(1, int(job.threads)))
    opset = int((job.params.get("export") or {}).get("opset", DEFAULT_OPSET))
    # A model built by package.module:factory loads when the user's config names it.
    factories = configured_factories(job.config)
    model = load_model(job.input["model"], device="cpu", model_factory=factories)
    onnx_meta = export_onnx(model, job.output["onnx"], opset)
    script_meta = export_torchscript(model, job.output["torchscript"])
    for path in (job.output["onnx"], job.output["torchscript"]):
        log.info("wrote %s (%d bytes) and its sidecar", path, Path(path).stat().st_size)
    return {"onnx": onnx_meta, "torchscript": script_meta}
