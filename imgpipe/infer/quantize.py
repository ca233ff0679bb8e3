"""int8 ONNX for CPU inference, and the test accuracy of each export beside the float model's.

Static quantisation (onnxruntime.quantization.quantize_static), not dynamic:
dynamic quantisation only quantises MatMul / Gemm weights well (a conv net's
convolutions become ConvInteger, which ONNX Runtime's CPU kernels run slower
than float), while static quantisation, calibrated on a few hundred training
images, turns every convolution into int8 with activation ranges measured on
real inputs. The QDQ format with per-channel weight scales keeps small conv nets
within a point of the float model; the export job measures exactly that on
the test role and records it in the sidecar (``quantization.test``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from imgpipe.core.errors import DataError

log = logging.getLogger("imgpipe")

# Training images the activation ranges are measured on (a seeded random sample).
CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 32
ACCURACY_BATCH = 256
QUANTIZE_MODES = ("none", "int8")


def calibration_sample(ids: np.ndarray, n: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """At most ``n`` of ``ids`` (a seeded random sample, sorted: shard reads stay in order)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) <= n:
        return np.sort(ids)
    return np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))


def _reader(images: np.ndarray, input_name: str, batch: int) -> Any:
    """A CalibrationDataReader over uint8 NHWC images, fed as the graph's NCHW input."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: np.ascontiguousarray(images[i : i + batch].transpose(0, 3, 1, 2))}
                for i in range(0, len(images), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    return Batches()


def quantize_int8(
    float_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calibration: np.ndarray,
    input_name: str = "images",
) -> dict[str, Any]:
    """Write ``int8_path``: ``float_path`` statically quantised (QDQ, per-channel int8 weights).

    ``calibration``: uint8 (N, S, S, C) training images whose activation ranges
    set the scales. Returns how it was quantised (for the sidecar).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise DataError("int8 export: no training image to calibrate on (export.quantize: none)")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # ONNX Runtime's recommended first step: shape inference and graph
            # optimisation (constant folding, fusions) so that quantisation sees
            # the graph the runtime will run.
            prepared = os.path.join(tmp, "prepared.onnx")
            quant_pre_process(os.fspath(float_path), prepared)
            quantize_static(
                prepared,
                os.fspath(int8_path),
                _reader(calibration, input_name, CALIBRATION_BATCH),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    except Exception as err:  # noqa: BLE001 - an op ONNX Runtime cannot quantise: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"int8 export failed ({type(err).__name__}: {first[:160]}); "
            "set export.quantize: none to export the float model only"
        ) from None
    return {
        "method": "static",
        "format": "QDQ",
        "weights": "int8, per channel",
        "activations": "uint8, MinMax ranges",
        "calibration_images": len(calibration),
        "calibration_role": "train",
    }


def probabilities(model: Any, images: Any, ids: np.ndarray) -> np.ndarray:
    """``model.probabilities`` of ``images[ids]`` (uint8 NHWC, e.g. the shards), batch by batch."""
    classes = len(model.class_names)
    out = [
        model.probabilities(images[ids[i : i + ACCURACY_BATCH]])
        for i in range(0, len(ids), ACCURACY_BATCH)
    ]
    return np.concatenate(out) if out else np.zeros((0, classes), np.float32)


def compare_on_test(
    float_probs: np.ndarray, int8_probs: np.ndarray, labels: Sequence[int]
) -> dict[str, Any]:
    """Accuracy of the float and the int8 model on the same test images, and how far apart they are."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise DataError("the split has no test image: cannot measure the int8 model's accuracy")
    float_pred, int8_pred = float_probs.argmax(axis=1), int8_probs.argmax(axis=1)
    return {
        "role": "test",
        "images": int(len(labels)),
        "accuracy_float": float(np.mean(float_pred == labels)),
        "accuracy_int8": float(np.mean(int8_pred == labels)),
        "label_agreement": float(np.mean(float_pred == int8_pred)),
        "max_abs_difference": float(np.max(np.abs(float_probs - int8_probs))),
    }
