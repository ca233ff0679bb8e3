"""Self-describing exports: preprocess.json, ONNX metadata_props, the doc's snippets, int8.

One tiny model per image setting (grey letterboxed, RGB cropped) is trained on
digits written as PNG files and exported; the snippets of
docs/use_your_model.md run in a fresh Python on square, oblong, colour and
transparent files and must give ``imgpipe predict``'s probabilities.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pandas as pd
import pytest
from conftest import TINY
from helpers.imagefactory import pattern, write_rgba_png
from helpers.workflow_utils import REPO, digits_tree

from imgpipe import cli
from imgpipe.data.ingest import prepare_images
from imgpipe.data.listing import list_images
from imgpipe.infer.export import (
    PROP_METADATA,
    PROP_PREPROCESS,
    HeldOutImages,
    export_int8,
    export_onnx,
    preprocess_spec,
    write_preprocess,
)
from imgpipe.infer.inference import load_model
from imgpipe.learn.fit import fit

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(srun|LeafSpec|logging interval|on_after_batch_transfer|all_gather is deprecated)"
)
CLASSES = ["0", "1", "2", "3"]
DOC = REPO / "docs" / "use_your_model.md"
SETTINGS = {
    "gray-pad": {"size": 12, "mode": "gray", "fit": "pad"},
    "rgb-crop": {"size": 12, "mode": "rgb", "fit": "crop"},
}


def doc_snippets() -> dict[str, str]:
    """The fenced Python blocks of the doc that follow a ``<!-- snippet: NAME -->`` comment."""
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"<!-- snippet: (\w+) -->\s*```python\n(.*?)```", text, re.S)
    return dict(found)


def train_images(tree: Path, image: dict) -> tuple[np.ndarray, np.ndarray]:
    """The tree's images as ingest prepares them, and their labels."""
    files = list_images(tree, [".png"])
    images = np.stack([array for _, array in prepare_images(files["path"], image, 10**8)])
    return images, files["label"].astype(int).to_numpy()


def write_odd_files(folder: Path) -> list[Path]:
    """Digit-like files of every shape the snippets handle: oblong, colour, transparent, enlarged."""
    folder.mkdir(parents=True, exist_ok=True)
    digit = cv2.imread(str(next((folder.parent / "digits" / "1").glob("*.png"))), 0)
    tall = cv2.resize(digit, (16, 26), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(folder / "tall_grey.png"), tall)
    wide = cv2.resize(digit, (30, 18), interpolation=cv2.INTER_NEAREST)
    colour = np.stack([wide, 255 - wide, (wide // 2 + 60).astype(np.uint8)], axis=-1)
    cv2.imwrite(str(folder / "wide_colour.png"), colour)
    rgba = pattern(20, 28, channels=4)
    rgba[:, :, 3] = np.linspace(40, 255, 28, dtype=np.uint8)[None, :]
    write_rgba_png(folder / "transparent.png", rgba)
    cv2.imwrite(str(folder / "small.png"), cv2.resize(digit, (10, 9), interpolation=cv2.INTER_AREA))
    return sorted(folder.iterdir())


@pytest.fixture(scope="module", params=list(SETTINGS))
def deployed(request, tmp_path_factory):
    """A run's folder as a user has it: results/train/final/model.ckpt and results/export/."""
    image = SETTINGS[request.param]
    base = tmp_path_factory.mktemp(request.param)
    tree = digits_tree(base / "digits", per_class=20, classes=4)
    images, labels = train_images(tree, image)
    ids = np.arange(len(images))
    final = base / "results" / "train" / "final"
    train = {**copy.deepcopy(TINY["train"]), "max_epochs": 12, "lr": 0.02}
    model_cfg = copy.deepcopy(TINY["model"])
    fit(images, labels, ids[ids % 5 != 0], ids[ids % 5 == 0], None, None, model_cfg, train, final,
        class_names=CLASSES, image_cfg=image)  # fmt: skip
    model = load_model(final / "model.ckpt")
    export = base / "results" / "export"
    write_preprocess(model, export / "preprocess.json")
    export_onnx(model, export / "model.onnx")
    files = [*sorted(tree.glob("*/000.png")), *write_odd_files(base / "odd")]
    return {"base": base, "model": model, "export": export, "files": files, "image": image}


def predicted_by_imgpipe(model_path: Path, files: list[Path], out: Path) -> pd.DataFrame:
    """``imgpipe predict`` on a manifest of ``files``: one row per file, indexed by path."""
    # The manifest lies in the files' common folder (a manifest's paths stay inside its folder).
    manifest = Path(os.path.commonpath(files)) / f"{out.stem}-{os.getpid()}-manifest.csv"
    pd.DataFrame({"path": [str(f) for f in files], "label": ""}).to_csv(manifest, index=False)
    assert cli.main(["predict", str(model_path), str(manifest), "-o", str(out), "-q"]) == 0
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert (rows["rejected"] == "").all(), rows[["path", "rejected", "detail"]]
    return rows.set_index("path")


def run_snippet(code: str, cwd: Path, files: list[Path]) -> pd.DataFrame:
    """Run a doc snippet as a script in ``cwd`` (a fresh Python): its ``path, label, probability`` lines."""
    script = cwd / "snippet.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, files)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    table = pd.DataFrame(rows, columns=["path", "label", "probability"]).set_index("path")
    return table.astype({"probability": float})


def test_the_doc_marks_both_snippets():
    assert set(doc_snippets()) == {"onnxruntime", "pytorch"}


# The PyTorch snippet's prepare() is the ONNX snippet's, checked in both settings: one
# setting is enough for its weights.
@pytest.mark.parametrize(
    ("deployed", "name"),
    [("gray-pad", "onnxruntime"), ("rgb-crop", "onnxruntime"), ("gray-pad", "pytorch")],
    indirect=["deployed"],
)
def test_doc_snippet_gives_imgpipe_predicts_probabilities(deployed, name, tmp_path):
    reference = predicted_by_imgpipe(
        deployed["export"] / "model.onnx", deployed["files"], tmp_path / "imgpipe.csv"
    )
    found = run_snippet(doc_snippets()[name], deployed["base"], deployed["files"])
    assert list(found.index) == [str(f) for f in deployed["files"]]
    assert found["label"].tolist() == reference.loc[found.index, "label"].tolist()
    expected = reference.loc[found.index, "probability"].astype(float)
    assert (found["probability"] - expected).abs().max() < 1e-4


def test_snippet_preprocessing_is_ingests_on_oblong_colour_and_transparent_files(
    deployed, monkeypatch
):
    # Exact pixels, not only probabilities: the letterbox colour and the crop included.
    monkeypatch.chdir(deployed["base"])
    namespace: dict = {}
    code = doc_snippets()["onnxruntime"]
    exec(code[: code.index("session = ")], namespace)  # the imports, the spec and prepare()
    spec = json.loads((deployed["export"] / "preprocess.json").read_text())
    prepared = prepare_images(map(str, deployed["files"]), deployed["image"], 10**8)
    for path, (_, array) in zip(deployed["files"], prepared, strict=True):
        mine = namespace["prepare"](str(path), spec)
        np.testing.assert_array_equal(mine, array.transpose(2, 0, 1), err_msg=path.name)


def test_onnx_metadata_props_carry_preprocess_json_and_the_metadata(deployed, tmp_path):
    model, export = deployed["model"], deployed["export"]
    spec = json.loads((export / "preprocess.json").read_text())
    assert spec == json.loads(json.dumps(preprocess_spec(model)))
    assert spec["class_names"] == CLASSES and spec["image"] == deployed["image"]
    assert spec["input"]["dtype"] == "uint8" and spec["input"]["layout"] == "NCHW"
    assert spec["normalisation"]["mean"] == model.metadata["normalisation"]["mean"]
    assert spec["imgpipe_version"] == "0.1.0"
    assert ("letterbox" in spec) == (deployed["image"]["fit"] == "pad")
    props = {p.key: p.value for p in onnx.load(str(export / "model.onnx")).metadata_props}
    assert json.loads(props[PROP_PREPROCESS]) == spec
    assert json.loads(props[PROP_METADATA]) == json.loads(json.dumps(model.metadata))
    assert json.loads(props["imgpipe.class_names"]) == CLASSES

    # Handed on without its sidecar, the file still predicts: from its metadata_props.
    alone = tmp_path / "alone.onnx"
    shutil.copy2(export / "model.onnx", alone)
    with_sidecar = predicted_by_imgpipe(
        export / "model.onnx", deployed["files"], tmp_path / "a.csv"
    )
    without = predicted_by_imgpipe(alone, deployed["files"], tmp_path / "b.csv")
    pd.testing.assert_frame_equal(with_sidecar, without)


def test_an_onnx_file_without_sidecar_or_props_gives_one_line(deployed, tmp_path, capsys):
    bare = onnx.load(str(deployed["export"] / "model.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    out = tmp_path / "p.csv"
    code = cli.main(
        ["predict", str(tmp_path / "bare.onnx"), str(deployed["files"][0]), "-o", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "bare.onnx.json (preprocessing and class names) is missing" in err
    assert "no 'imgpipe.metadata' metadata_props entry" in err


# ----------------------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def quantised(deployed, tmp_path_factory):
    """The grey model quantised to int8 on its training images, compared on 600 unseen digits."""
    base = tmp_path_factory.mktemp("int8")
    images, labels = train_images(
        digits_tree(base / "digits", per_class=170, classes=4), SETTINGS["gray-pad"]
    )
    # digits_tree writes the same first 20 of each class the model trained on: leave them out.
    unseen = np.flatnonzero(np.arange(len(images)) % 170 >= 20)
    calibration = images[np.flatnonzero(np.arange(len(images)) % 170 < 20)]
    export = deployed["export"]
    meta = export_int8(
        deployed["model"], export / "model.onnx", export / "model.int8.onnx", calibration,
        HeldOutImages(images, unseen, labels[unseen]),
    )  # fmt: skip
    return {"meta": meta, "path": export / "model.int8.onnx"}


@pytest.mark.parametrize("deployed", ["gray-pad"], indirect=True)  # one int8 check
def test_int8_accuracy_is_within_a_point_of_float(quantised):
    test = quantised["meta"]["quantization"]["test"]
    assert test["images"] == 600 and test["role"] == "test"
    assert test["accuracy_float"] > 0.8  # a model worth quantising
    assert abs(test["accuracy_int8"] - test["accuracy_float"]) <= 0.01, test
    assert quantised["meta"]["quantization"]["method"] == "static"
    on_disk = json.loads(Path(f"{quantised['path']}.json").read_text())
    assert on_disk["quantization"]["test"] == test
    ops = {node.op_type for node in onnx.load(str(quantised["path"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize("deployed", ["gray-pad"], indirect=True)  # one int8 check
def test_imgpipe_predict_takes_the_int8_file(deployed, quantised, tmp_path):
    float_rows = predicted_by_imgpipe(
        deployed["export"] / "model.onnx", deployed["files"], tmp_path / "f.csv"
    )
    int8_rows = predicted_by_imgpipe(quantised["path"], deployed["files"], tmp_path / "i.csv")
    assert len(int8_rows) == len(float_rows)
    agree = (int8_rows["label"] == float_rows["label"]).mean()
    assert agree >= 0.8, (int8_rows["label"].tolist(), float_rows["label"].tolist())


def test_a_graph_that_cannot_be_quantised_gives_one_line(tmp_path):
    from imgpipe.core.errors import DataError
    from imgpipe.infer.quantize import quantize_int8

    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x00not onnx" * 20)
    images = np.zeros((4, 12, 12, 1), np.uint8)
    with pytest.raises(DataError, match=r"^int8 export failed \(.*set export.quantize: none"):
        quantize_int8(garbage, tmp_path / "model.int8.onnx", images)
    with pytest.raises(DataError, match="no training image to calibrate on"):
        quantize_int8(garbage, tmp_path / "model.int8.onnx", images[:0])
    assert not (tmp_path / "model.int8.onnx").exists()
