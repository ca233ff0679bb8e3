"""The export stage (rule export): the final model as ONNX and TorchScript (optionally int8), with its preprocessing."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from imgpipe.core.atomic import write_json
from imgpipe.infer.export import (
    export_int8,
    export_onnx,
    export_torchscript,
    role_images,
    write_preprocess,
)
from imgpipe.infer.inference import SIDECAR_SUFFIX, load_model
from imgpipe.infer.modelfile import configured_factories
from imgpipe.workflow.settings import ExportSettings
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_export(job: StageJob) -> dict[str, Any]:
    """The export stage: model.onnx, model.pt (each with its sidecar), preprocess.json, model.int8.onnx."""
    from imgpipe.infer.quantize import calibration_sample

    torch.set_num_threads(max(1, int(job.threads)))
    settings = ExportSettings.from_config(job.params["export"])
    opset = int(settings.opset)
    # A model built by package.module:factory loads when the user's config names it.
    factories = configured_factories(job.config)
    model = load_model(job.input["model"], device="cpu", model_factory=factories)
    write_preprocess(model, job.output["preprocess"])
    onnx_meta = export_onnx(model, job.output["onnx"], opset)
    script_meta = export_torchscript(model, job.output["torchscript"])
    written = [job.output["onnx"], job.output["torchscript"]]
    result = {"onnx": onnx_meta, "torchscript": script_meta}
    if settings.quantize == "int8":
        images, train_ids, test = role_images(
            job.input["index"], job.input["split"], model.class_names
        )
        calibration = images[calibration_sample(train_ids)]
        int8_meta = export_int8(model, job.output["onnx"], job.output["int8"], calibration, test)
        # The float model's sidecar gets the same test figures (its accuracy beside int8's).
        onnx_meta["test"] = {
            key: int8_meta["quantization"]["test"][key] for key in ("role", "images")
        } | {"accuracy": int8_meta["quantization"]["test"]["accuracy_float"]}
        write_json(onnx_meta, f"{os.fspath(job.output['onnx'])}{SIDECAR_SUFFIX}")
        result["int8"] = int8_meta
        written.append(job.output["int8"])
    for path in written:
        log.info("wrote %s (%d bytes) and its sidecar", path, Path(path).stat().st_size)
    return result
