"""The model in use, end to end: train -> evaluate -> export -> predict with real Snakemake runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.workflow_utils import planned_jobs, snakemake, tree_digest, write_config

pytestmark = pytest.mark.slow

HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro")


def imgpipe_predict(workdir, *args) -> subprocess.CompletedProcess:
    """``imgpipe predict ...`` from the workflow copy (its own imgpipe package), no Snakemake."""
    proc = subprocess.run(
        [sys.executable, "-m", "imgpipe.cli", "predict", *map(str, args), "-q"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(workdir)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_train_evaluate_export_predict(finished_copy, tmp_path):
    # A finished run (train and evaluate done) gains a predict section: adding it
    # schedules the export and the prediction and reruns nothing upstream.
    workdir = finished_copy
    config = write_config(workdir, {"predict": {"input": "data", "name": "demo", "batch_size": 16}})
    assert planned_jobs(workdir, "results/evaluate/metrics.json", "export", "predict") == {
        "export": 1,
        "predict": 1,
    }
    before = tree_digest(workdir / "data")
    snakemake(workdir, "results/evaluate/metrics.json", "export", "predict")
    results = workdir / "results"
    assert tree_digest(workdir / "data") == before

    # The model file: self-describing, with test metrics equal to evaluate's report.
    state = torch.load(results / "train/final/model.ckpt", map_location="cpu", weights_only=True)
    meta = state["imgpipe"]
    evaluated = json.loads((results / "evaluate/metrics.json").read_text())
    assert meta["test_metrics"]["n_test"] == evaluated["n_test"] > 0
    for key in HEADLINE:
        assert meta["test_metrics"][key] == pytest.approx(evaluated[key], abs=1e-12), key
    assert meta["class_names"] == evaluated["classes"] == ["0", "1", "2", "3"]
    assert meta["image"] == {"size": 12, "mode": "gray", "fit": "pad"}
    assert meta["clean"]["min_side"] == config["clean"]["min_side"]
    assert meta["max_pixels"] == config["ingest"]["max_pixels"]
    assert meta["extensions"] == config["data"]["extensions"]
    assert meta["architecture"]["channels"] == config["model"]["channels"]
    # Evaluate's baselines are fitted on the final model's own training images.
    baselines = evaluated["baselines"]
    assert sum(meta["train_class_counts"].values()) == baselines["majority"]["n_train"] > 0
    assert baselines["linear_pixels"]["n_train"] == baselines["majority"]["n_train"]
    assert 0 <= baselines["linear_pixels"]["accuracy"] <= 1

    # Export: both files with sidecars; the ONNX opset is the configured one.
    onnx_meta = json.loads((results / "export/model.onnx.json").read_text())
    script_meta = json.loads((results / "export/model.pt.json").read_text())
    assert onnx_meta["opset"] == config["export"]["opset"]
    assert onnx_meta["imgpipe"]["test_metrics"] == meta["test_metrics"]
    assert script_meta["class_names"] == meta["class_names"]
    # Self-describing (issue 22): preprocess.json, and int8 with its test accuracy beside float's.
    preprocess = json.loads((results / "export/preprocess.json").read_text())
    assert preprocess["class_names"] == meta["class_names"]
    assert preprocess["image"] == meta["image"] and "letterbox" in preprocess
    int8_test = json.loads((results / "export/model.int8.onnx.json").read_text())["quantization"]
    assert int8_test["test"]["images"] == evaluated["n_test"] == onnx_meta["test"]["images"]
    assert int8_test["test"]["accuracy_float"] == pytest.approx(evaluated["accuracy"], abs=1e-12)
    assert onnx_meta["test"]["accuracy"] == int8_test["test"]["accuracy_float"]

    # The predict rule: one row per file of the tree, a labelled tree, the montage.
    predicted = pd.read_csv(results / "predict/demo/predictions.csv", keep_default_na=False)
    assert len(predicted) == 80
    summary = json.loads((results / "predict/demo/metrics.json").read_text())
    assert summary["labelled"] and summary["metrics"]["n_labelled"] == summary["predicted"]
    assert (results / "predict/demo/montage.png").stat().st_size > 0
    assert planned_jobs(workdir, "results/evaluate/metrics.json", "export", "predict") == {}
    # The default target reruns the snapshot (the config gained predict:) and the report,
    # which now shows the export's test accuracy; nothing upstream.
    assert planned_jobs(workdir) == {"config_snapshot": 1, "report": 1, "all": 1}
    snakemake(workdir)
    page = (results / "report/index.html").read_text()
    assert "Exported models" in page and "ONNX int8 (model.int8.onnx)" in page
    assert planned_jobs(workdir) == {}

    # imgpipe predict on the test split gives evaluate's labels, from the checkpoint and ONNX.
    evaluation = pd.read_csv(results / "evaluate/predictions.csv", dtype=str)
    manifest = workdir / "test_split.csv"
    # Its paths are the finished run's (<run>/data/<class>/<file>): the same files in the copy.
    rel = [str(Path(p).relative_to(Path(p).parents[2])) for p in evaluation["path"]]
    pd.DataFrame({"path": rel, "label": evaluation["label"]}).to_csv(manifest, index=False)
    tables = {}
    for name, model in (
        ("ckpt", "results/train/final/model.ckpt"),
        ("onnx", "results/export/model.onnx"),
    ):
        out = tmp_path / f"{name}.csv"
        proc = imgpipe_predict(workdir, model, manifest, "-o", out, "--batch-size", "7")
        assert (
            f"accuracy {evaluated['accuracy']:.4f}, macro F1 {evaluated['f1_macro']:.4f}"
            in proc.stdout
        )
        table = pd.read_csv(out, dtype=str, keep_default_na=False)
        assert (table["rejected"] == "").all()
        tables[name] = table.set_index("relpath").loc[rel]
    for name, table in tables.items():
        assert table["label"].tolist() == evaluation["predicted"].tolist(), name
    np.testing.assert_allclose(
        tables["onnx"]["probability"].astype(float),
        tables["ckpt"]["probability"].astype(float),
        atol=1e-4,
    )


def test_predict_runs_again_when_images_are_added_to_its_input(finished_copy):
    workdir = finished_copy
    incoming = workdir / "incoming"
    (incoming / "batch").mkdir(parents=True)
    for name in ("000.png", "001.png"):
        shutil.copy2(workdir / "data" / "0" / name, incoming / "batch" / name)
    write_config(workdir, {"predict": {"input": "incoming", "name": "new"}})
    snakemake(workdir, "predict")
    assert planned_jobs(workdir, "predict") == {}  # finished: nothing to do
    # Added inside a subfolder: no mtime of the input folder itself changes.
    shutil.copy2(workdir / "data" / "1" / "000.png", incoming / "batch" / "002.png")
    assert planned_jobs(workdir, "predict") == {"predict": 1}
    snakemake(workdir, "predict")
    predicted = pd.read_csv(workdir / "results/predict/new/predictions.csv", dtype=str)
    assert predicted["relpath"].tolist() == [f"batch/00{n}.png" for n in range(3)]
    assert planned_jobs(workdir, "predict") == {}
