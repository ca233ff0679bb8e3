"""Using a trained model: the self-describing model file, one preprocessing path, predicting files.

One small model is trained once for the module on digits written as PNG files
and read through the pipeline's own preprocessing (imgpipe.data.ingest.prepare_images).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from helpers.imagefactory import (
    make_tree,
    pattern,
    symlink,
    write_bomb_png,
    write_corrupt_png,
    write_exif_rotated_jpeg,
    write_palette_png,
    write_rgba_png,
    write_text_as_png,
    write_truncated,
    write_zero_byte,
)
from helpers.workflow_utils import REPO, digits_tree, tree_digest
from sklearn.metrics import accuracy_score, f1_score

from imgpipe import cli
from imgpipe.data.ingest import index_shard, prepare_images
from imgpipe.data.listing import list_images
from imgpipe.infer.export import export_onnx, export_torchscript, max_difference
from imgpipe.infer.inference import Model, load_model, predict_proba
from imgpipe.infer.modelfile import METADATA_KEY
from imgpipe.learn.fit import fit
from imgpipe.stages.predict import (
    list_inputs,
    predict_files,
    prediction_columns,
    run_predict,
    screen,
)
from imgpipe.workflow.stage_job import StageJob

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(srun|LeafSpec|logging interval|on_after_batch_transfer|all_gather is deprecated)"
)
IMAGE = {"size": 12, "mode": "gray", "fit": "pad"}
CLASSES = ["0", "1", "2", "3"]
EXTS = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_section, tiny_train_section):
    """A digits tree (4 classes x 20 PNGs), its arrays as ingest makes them, a model trained on them."""
    base = tmp_path_factory.mktemp("trained")
    tree = digits_tree(base / "digits", per_class=20, classes=4)
    files = list_images(tree, EXTS)
    prepared = list(prepare_images(files["path"], IMAGE, 10**8))
    images = np.stack([array for _, array in prepared])
    labels = files["label"].astype(int).to_numpy()
    ids = np.arange(len(images))
    train = {**tiny_train_section, "max_epochs": 12, "lr": 0.02}
    fit(
        images,
        labels,
        ids[ids % 5 != 0],
        ids[ids % 5 == 0],
        None,
        None,
        tiny_model_section,
        train,
        base / "model",
        class_names=CLASSES,
        image_cfg=IMAGE,
    )
    return {"tree": tree, "files": files, "images": images, "ckpt": base / "model" / "model.ckpt"}


@pytest.fixture(scope="module")
def tiny_model_section():
    """The tiny config's model section (a module-scoped twin of conftest's tiny_model)."""
    return copy.deepcopy(TINY["model"])


@pytest.fixture(scope="module")
def tiny_train_section():
    """The tiny config's train section."""
    return copy.deepcopy(TINY["train"])


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The model as ONNX and TorchScript (with sidecars)."""
    out = tmp_path_factory.mktemp("export")
    model = load_model(trained["ckpt"])
    onnx_meta = export_onnx(model, out / "model.onnx")
    script_meta = export_torchscript(model, out / "model.pt")
    return {"onnx": out / "model.onnx", "pt": out / "model.pt", "metas": (onnx_meta, script_meta)}


def read_predictions(path) -> pd.DataFrame:
    """predictions.csv as text (a file name that is not UTF-8 comes back as os.fsdecode made it)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="surrogateescape")


# ----------------------------------------------------------------------------- the model file


def test_model_file_round_trip(trained, tmp_path):
    # Only the file: copied away from everything training left beside it.
    alone = tmp_path / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy2(trained["ckpt"], alone)
    model = load_model(alone)
    assert model.kind == "checkpoint" and model.device == "cpu"
    expected = predict_proba(trained["ckpt"], trained["images"])
    found = model.probabilities(trained["images"])
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-6)
    assert (found.argmax(1) == expected.argmax(1)).all()

    state = torch.load(alone, map_location="cpu", weights_only=True)  # plain types only
    meta = state[METADATA_KEY]
    assert meta == model.metadata
    assert meta["imgpipe_version"] == "0.1.0" and meta["format"] == 1
    assert len(meta["config_sha256"]) == 64
    assert meta["class_names"] == CLASSES == model.class_names
    assert meta["image"] == IMAGE == model.image
    arch = meta["architecture"]
    assert arch["name"] == "smallcnn" and arch["channels"] == [8, 16]
    assert (arch["num_classes"], arch["in_channels"], arch["image_size"]) == (4, 1, 12)
    hparams = state["hyper_parameters"]
    assert meta["normalisation"]["mean"] == pytest.approx(list(hparams["mean"]))
    assert meta["normalisation"]["std"] == pytest.approx(list(hparams["std"]))
    # Settings a plain fit does not know come from train_final (prediction then uses clean's defaults).
    assert model.clean == {} and model.max_pixels == 10**8
    assert ".png" in model.extensions


def test_config_hash_follows_the_training_settings(trained):
    from imgpipe.infer.modelfile import config_hash

    hparams = torch.load(trained["ckpt"], weights_only=True)["hyper_parameters"]
    assert config_hash(hparams) == load_model(trained["ckpt"]).metadata["config_sha256"]
    changed = {**hparams, "train_cfg": {**hparams["train_cfg"], "lr": 0.5}}
    assert config_hash(changed) != config_hash(hparams)


def test_load_model_refuses_what_it_cannot_use(tmp_path, trained):
    from imgpipe.core.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        load_model(tmp_path / "missing.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(DataError, match="not an imgpipe model file"):
        load_model(tmp_path / "other.ckpt")
    shutil.copy2(trained["ckpt"], tmp_path / "alone.onnx")  # no sidecar, and no ONNX inside
    with pytest.raises(DataError, match="cannot be read as an ONNX model"):
        load_model(tmp_path / "alone.onnx")
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="no usable CUDA"):
            load_model(trained["ckpt"], device="cuda")


# ----------------------------------------------------------------------------- one preprocessing path


def identity_tree(root: Path) -> Path:
    rng = np.random.default_rng(3)
    indices = rng.integers(0, 4, (20, 30))
    palette = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [240, 240, 30]])
    rgba = np.concatenate([pattern(18, 26), rng.integers(0, 256, (18, 26, 1))], axis=2)
    make_tree(
        root,
        {
            "c/rgb.png": pattern(20, 36),
            "c/grey.png": pattern(30, 17, channels=1),
            "c/photo.jpg": pattern(40, 24, block=8),
            "c/palette.png": lambda p: write_palette_png(p, indices, palette),
            "c/rotated.jpg": lambda p: write_exif_rotated_jpeg(p, 6),
            "c/alpha.png": lambda p: write_rgba_png(p, rgba.astype(np.uint8)),
            "c/large.png": pattern(300, 200, block=16),
        },
    )
    return root


@pytest.mark.parametrize("mode", ["gray", "rgb"])
@pytest.mark.parametrize("fit_mode", ["pad", "crop"])
def test_prediction_decodes_a_file_to_the_array_ingest_wrote(tmp_path, mode, fit_mode):
    tree = identity_tree(tmp_path / "data")
    image_cfg = {"size": 16, "mode": mode, "fit": fit_mode}
    files = list_images(tree, EXTS)
    stats = index_shard(files, 0, 1, image_cfg, 10**8, tmp_path / "s.csv", tmp_path / "i.npy")
    ingested = np.load(tmp_path / "i.npy")
    assert (stats["status"] == "ok").all()
    # A model that takes these settings; every quality check off, so every file reaches it.
    quiet = {"low_information": None, "dark": None, "bright": None, "blur": None}
    model = Model("", "checkpoint", "cpu", {"image": image_cfg, "clean": quiet}, run=None)
    listed, _ = list_inputs(tree, EXTS)
    screened = {listed.at[item.row, "path"]: item for item in screen(listed, model)}
    assert len(screened) == len(stats) == 7
    for row in stats.itertuples():
        item = screened[row.path]
        assert item.reason == "", (row.relpath, item.reason)
        np.testing.assert_array_equal(item.array, ingested[row.row], err_msg=row.relpath)
    assert screened[str(tree / "c" / "rotated.jpg")].array.shape == (
        16,
        16,
        3 if mode == "rgb" else 1,
    )


# ----------------------------------------------------------------------------- bad files


def bad_folder(root: Path, good: Path) -> dict[str, str]:
    """An unlabelled folder of good digits and every kind of bad file; returns relpath -> reason."""
    rng = np.random.default_rng(0)
    spec = {
        "good/a.png": (good / "0" / "000.png").read_bytes(),
        "b.png": (good / "1" / "000.png").read_bytes(),
        "nested/deeper/c.png": (good / "2" / "000.png").read_bytes(),
        "zero.png": write_zero_byte,
        "truncated.png": lambda p: write_truncated(p, "png"),
        "truncated.jpg": lambda p: write_truncated(p, "jpeg"),
        "text.png": write_text_as_png,
        "corrupt.png": write_corrupt_png,
        "bomb.png": write_bomb_png,
        "tiny.png": pattern(4, 4),
        "sliver.png": pattern(12, 200),
        "blank_grey.png": np.full((20, 20, 3), 128, np.uint8),
        "blank_white.png": np.full((20, 20, 3), 255, np.uint8),
        "dark.png": np.full((20, 20, 3), 3, np.uint8),
        "blurry.png": np.clip(
            np.linspace(0, 255, 40)[None, :, None] + np.zeros((40, 40, 3)), 0, 255
        ).astype(np.uint8),
        ".hidden.png": (good / "3" / "000.png").read_bytes(),
        ".cache/x.png": (good / "3" / "001.png").read_bytes(),
        "notes.txt": "not an image",
        "anim.gif": b"GIF89a",
        "no_extension": "text",
        "dangling.png": symlink("missing-target.png"),
        "loop.png": symlink("loop.png"),
        "empty_folder": None,
        "noise.bmp": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
    }
    make_tree(root, spec)
    return {
        "good/a.png": "",
        "b.png": "",
        "nested/deeper/c.png": "",
        "noise.bmp": "",
        "zero.png": "zero_byte",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
        "text.png": "not_image",
        "corrupt.png": "unreadable",
        "bomb.png": "too_large",
        "tiny.png": "too_small",
        "sliver.png": "odd_aspect",
        "blank_grey.png": "low_information",
        "blank_white.png": "too_bright",
        "dark.png": "too_dark",
        "blurry.png": "blurry",
        ".hidden.png": "hidden",
        ".cache": "hidden",
        "notes.txt": "unsupported_extension",
        "anim.gif": "unsupported_extension",
        "no_extension": "unsupported_extension",
        "dangling.png": "broken_symlink",
        "loop.png": "symlink_loop",
    }


def test_predict_rule_gives_every_bad_file_a_row_with_its_reason(trained, tmp_path):
    folder = tmp_path / "incoming"
    expected = bad_folder(folder, trained["tree"])
    before = tree_digest(folder)
    out = tmp_path / "results" / "predict" / "demo"
    job = StageJob(
        input={"model": str(trained["ckpt"]), "images": str(folder)},
        output={
            "predictions": str(out / "predictions.csv"),
            "montage": str(out / "montage.png"),
            "metrics": str(out / "metrics.json"),
        },
        params={"settings": {"input": str(folder), "name": "demo", "batch_size": 3}},
        threads=1,
    )
    summary = run_predict(job)
    assert tree_digest(folder) == before  # byte for byte, mode for mode
    table = read_predictions(out / "predictions.csv")
    assert list(table.columns) == prediction_columns(len(CLASSES))  # topk 5 capped at 4
    assert table["relpath"].is_unique
    assert dict(zip(table["relpath"], table["rejected"], strict=True)) == expected
    predicted = table[table["rejected"] == ""]
    assert (predicted["label"].isin(CLASSES)).all()
    probs = predicted[["probability", "probability_2", "probability_3", "probability_4"]]
    assert (probs.astype(float).diff(axis=1).iloc[:, 1:] <= 0).all().all()  # decreasing order
    rejected = table[table["rejected"] != ""]
    assert (rejected["label"] == "").all() and (rejected["probability"] == "").all()
    assert (table.loc[table["relpath"] == "tiny.png", "detail"] == "min side 4 < 8").all()
    assert (table["given_label"] == "").all()  # images in the root: not a labelled tree
    assert summary["predicted"] == 4 and summary["labelled"] is False
    assert sum(summary["rejected"].values()) == len(expected) - 4
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rejected"] == summary["rejected"] and "metrics" not in saved
    assert (out / "montage.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "montage.png",
        "predictions.csv",
    ]


def test_quality_checks_use_the_models_clean_settings(trained, tmp_path):
    folder = tmp_path / "in"
    make_tree(folder, {"tiny.png": pattern(4, 4), "grey.png": np.full((20, 20), 128, np.uint8)})
    model = load_model(trained["ckpt"])
    predict_files(model, folder, tmp_path / "p.csv")
    assert read_predictions(tmp_path / "p.csv")["rejected"].tolist() == [
        "low_information",
        "too_small",
    ]
    model.metadata["clean"] = {"min_side": 2, "low_information": None, "blur": None}
    predict_files(model, folder, tmp_path / "p.csv")
    assert read_predictions(tmp_path / "p.csv")["rejected"].tolist() == ["", ""]


# ----------------------------------------------------------------------------- the command


def predict_command(model, source, out, *extra: str) -> int:
    """``imgpipe predict MODEL SOURCE -o OUT [extra...]`` run in this process: its exit code."""
    return cli.main(["predict", str(model), str(source), "-o", str(out), *extra])


def test_command_on_a_labelled_tree_prints_and_writes_accuracy_and_macro_f1(
    trained, tmp_path, capsys
):
    out = tmp_path / "out" / "predictions.csv"
    before = tree_digest(trained["tree"])
    assert predict_command(trained["ckpt"], trained["tree"], out, "-q") == 0
    printed = capsys.readouterr().out
    table = read_predictions(out)
    assert len(table) == 80 and (table["rejected"] == "").all()
    assert (table["given_label"] == table["relpath"].str.split("/").str[0]).all()
    accuracy = accuracy_score(table["given_label"], table["label"])
    macro_f1 = f1_score(table["given_label"], table["label"], average="macro")
    assert f"accuracy {accuracy:.4f}, macro F1 {macro_f1:.4f} (80 labelled images)" in printed
    metrics = json.loads((tmp_path / "out" / "predictions.metrics.json").read_text())
    assert metrics["labelled"] is True
    assert metrics["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert metrics["metrics"]["f1_macro"] == pytest.approx(macro_f1)
    assert set(metrics["metrics"]["per_class"]) == set(CLASSES)
    assert accuracy > 0.5  # chance is 0.25
    assert tree_digest(trained["tree"]) == before


def test_command_on_a_manifest_and_on_an_unlabelled_folder(trained, tmp_path, capsys):
    tree = trained["tree"]
    manifest = tmp_path / "list.csv"
    rows = [f"{tree}/0/000.png,0", f"{tree}/1/000.png,1", f"{tree}/1/001.png,", "missing.png,2"]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    # Absolute paths outside the manifest's folder are refused, as in training.
    assert predict_command(trained["ckpt"], manifest, tmp_path / "m.csv", "-q") == 0
    table = read_predictions(tmp_path / "m.csv")
    assert set(table["rejected"]) == {"outside_root", "missing_file"}
    local = tmp_path / "local"
    shutil.copytree(tree / "2", local / "imgs")
    (local / "list.csv").write_text("path,label\nimgs/000.png,2\nimgs/001.png,2\nimgs/002.png,\n")
    assert predict_command(trained["ckpt"], local / "list.csv", tmp_path / "l.csv", "-q") == 0
    table = read_predictions(tmp_path / "l.csv")
    assert (table["rejected"] == "").all() and len(table) == 3
    # One image without a label: the manifest does not count as labelled.
    assert (table["given_label"] == "").all()
    capsys.readouterr()
    assert predict_command(trained["ckpt"], local / "imgs", tmp_path / "u.csv", "-q") == 0
    printed = capsys.readouterr().out
    assert "20 files: 20 predicted" in printed and "accuracy" not in printed


def test_predict_refuses_links_leading_out_and_keeps_byte_names(trained, tmp_path, capsys):
    tree, folder = trained["tree"], tmp_path / "incoming"
    make_tree(
        folder,
        {
            "a.png": (tree / "0" / "000.png").read_bytes(),
            "inside.png": symlink("a.png"),
            "out.png": symlink(tree / "1" / "000.png"),
        },
    )
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.png")  # a Latin-1 file name
    with open(latin1, "wb") as fh:
        fh.write((tree / "2" / "000.png").read_bytes())
    out = tmp_path / "p.csv"
    assert predict_command(trained["ckpt"], folder, out, "-q") == 0
    assert "4 files: 3 predicted, 1 rejected (outside_root 1)" in capsys.readouterr().out
    table = read_predictions(out)
    rejected = dict(zip(table["relpath"], table["rejected"], strict=True))
    assert rejected == {
        "a.png": "",
        "caf\udce9.png": "",
        "inside.png": "",
        "out.png": "outside_root",
    }
    assert latin1 in {os.fsencode(path) for path in table["path"]}  # the same bytes back
    assert predict_command(trained["ckpt"], folder, out, "-q", "--follow-symlinks") == 0
    assert (read_predictions(out)["rejected"] == "").all()
    # The predict rule: its config section's follow_symlinks.
    settings = {"input": str(folder), "name": "n", "follow_symlinks": True}
    job = StageJob(
        input={"model": str(trained["ckpt"]), "images": str(folder)},
        output={
            "predictions": str(tmp_path / "rule" / "predictions.csv"),
            "montage": str(tmp_path / "rule" / "montage.png"),
            "metrics": str(tmp_path / "rule" / "metrics.json"),
        },
        params={"settings": settings},
        threads=1,
    )
    assert run_predict(job)["predicted"] == 4


def test_command_refuses_cuda_without_a_gpu_in_one_line(trained, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = predict_command(trained["ckpt"], trained["tree"], tmp_path / "p.csv", "--device", "cuda")
    assert code == 1
    assert (
        capsys.readouterr().err.strip()
        == "imgpipe: device cuda: torch finds no usable CUDA device here"
    )
    assert not (tmp_path / "p.csv").exists()


def test_console_script_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["imgpipe"] == "imgpipe.cli:main"


# ----------------------------------------------------------------------------- export parity


def test_onnx_and_torchscript_match_pytorch(trained, exported):
    images = trained["images"]
    reference = load_model(trained["ckpt"]).probabilities(images)
    for path in (exported["onnx"], exported["pt"]):
        model = load_model(path, trust_torchscript=True)
        found = model.probabilities(images)
        assert max_difference(reference, found) <= 1e-4, path
        assert (found.argmax(1) == reference.argmax(1)).all(), path
        assert model.class_names == CLASSES and model.image == IMAGE
        # Dynamic batch axis: any batch size, one image included.
        np.testing.assert_allclose(model.probabilities(images[:1]), found[:1], atol=1e-5)
        np.testing.assert_allclose(model.probabilities(images[5:12]), found[5:12], atol=1e-5)
    onnx_meta, script_meta = exported["metas"]
    assert onnx_meta["opset"] == 17 and onnx_meta["runtime"] == "onnxruntime"
    assert script_meta["runtime"] == "torchscript"
    for meta in (onnx_meta, script_meta):
        assert meta["class_names"] == CLASSES
        assert meta["input"] == {
            "name": "images",
            "dtype": "uint8",
            "layout": "NCHW",
            "shape": ["batch", 1, 12, 12],
            "range": [0, 255],
        }
        assert meta["preprocessing"]["image"] == IMAGE
        assert meta["parity"]["max_abs_difference"] <= 1e-4
    on_disk = json.loads(Path(f"{exported['onnx']}.json").read_text())
    assert on_disk == json.loads(json.dumps(onnx_meta))
    assert sorted(p.name for p in exported["onnx"].parent.iterdir()) == [
        "model.onnx",
        "model.onnx.json",
        "model.pt",
        "model.pt.json",
    ]


def test_torchscript_takes_float_pixels_too(trained, exported):
    scripted = load_model(exported["pt"], trust_torchscript=True).module
    batch = torch.from_numpy(trained["images"][:8].transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        np.testing.assert_allclose(
            scripted(batch.float()).numpy(), scripted(batch).numpy(), atol=1e-7
        )


def test_command_with_the_onnx_file_gives_the_checkpoints_labels(trained, exported, tmp_path):
    args = ["--batch-size", "7", "-q"]
    assert predict_command(trained["ckpt"], trained["tree"], tmp_path / "t.csv", *args) == 0
    assert predict_command(exported["onnx"], trained["tree"], tmp_path / "o.csv", *args) == 0
    torch_rows, onnx_rows = (
        read_predictions(tmp_path / "t.csv"),
        read_predictions(tmp_path / "o.csv"),
    )
    assert onnx_rows["label"].tolist() == torch_rows["label"].tolist()
    diff = (onnx_rows["probability"].astype(float) - torch_rows["probability"].astype(float)).abs()
    assert diff.max() <= 1e-4


# ----------------------------------------------------------------------------- memory


def write_many(folder: Path, n: int, start: int = 0) -> None:
    """``n`` distinct 256 x 256 RGB PNGs (192 KiB each once decoded)."""
    import cv2

    base = pattern(256, 256, block=32)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        image = np.roll(base, i % 256, axis=1)
        image[:8, :8] = i % 251
        cv2.imwrite(str(folder / f"{i:05d}.png"), image)


def peak_rss_mb(model: Path, folder: Path, out: Path) -> float:
    """Peak resident memory (MiB) of ``imgpipe predict`` on ``folder`` in a fresh process."""
    code = (
        "import resource, sys\n"
        "from imgpipe.cli import main\n"
        "assert main(sys.argv[1:]) == 0\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    args = [str(model), str(folder), "-o", str(out), "--batch-size", "64", "--threads", "1", "-q"]
    proc = subprocess.run(
        [sys.executable, "-c", code, "predict", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("PEAK")[-1]) / 1024


@pytest.mark.slow
def test_memory_stays_bounded_on_a_large_folder(trained, tmp_path):
    """3,000 files of 192 KiB decoded each (560 MiB in all) need no more memory than 1,000."""
    large, small = tmp_path / "large", tmp_path / "small"
    write_many(large, 3000)
    small.mkdir()
    for path in sorted(large.iterdir())[:1000]:
        os.link(path, small / path.name)
    peaks = {}
    for name, folder in (("small", small), ("large", large)):
        peaks[name] = peak_rss_mb(trained["ckpt"], folder, tmp_path / f"{name}.csv")
        assert len(read_predictions(tmp_path / f"{name}.csv")) == len(os.listdir(folder))
    # Holding the extra 2,000 decoded images would take 375 MiB more.
    assert peaks["large"] - peaks["small"] < 40, peaks


# ----------------------------------------------------------------------------- flags, formats, workers


def mixed_folder(root: Path, trained: dict) -> Path:
    """The 80 digits (in their class folders) and a few bad files beside them: rows with reasons."""
    shutil.copytree(trained["tree"], root)
    make_tree(
        root,
        {
            "zero.png": write_zero_byte,
            "corrupt.png": write_corrupt_png,
            "tiny.png": pattern(4, 4),
            "notes.txt": "not an image",
        },
    )
    return root


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def scores_by_class(table: pd.DataFrame, column: str, k: int) -> np.ndarray:
    """(rows, classes) scores from the label_i / <column>_i pairs of a table listing every class."""
    out = np.full((len(table), len(CLASSES)), np.nan)
    for rank in range(1, k + 1):
        suffix = "" if rank == 1 else f"_{rank}"
        labels = table["label" + suffix].astype(int).to_numpy()
        out[np.arange(len(table)), labels] = table[column + suffix].astype(float).to_numpy()
    return out


def test_topk_ranks_k_classes_capped_at_the_class_count(trained, tmp_path):
    assert (
        predict_command(trained["ckpt"], trained["tree"], tmp_path / "k2.csv", "-q", "--topk", "2")
        == 0
    )
    two = read_predictions(tmp_path / "k2.csv")
    assert list(two.columns) == prediction_columns(2)
    assert list(two.columns)[2:6] == ["label", "probability", "label_2", "probability_2"]
    assert (two["probability"].astype(float) >= two["probability_2"].astype(float)).all()
    assert (
        predict_command(trained["ckpt"], trained["tree"], tmp_path / "k9.csv", "-q", "--topk", "9")
        == 0
    )
    every = read_predictions(tmp_path / "k9.csv")
    assert list(every.columns) == prediction_columns(4) and "label_5" not in every.columns
    assert (
        every[["label", "label_2", "label_3", "label_4"]].apply(set, axis=1) == set(CLASSES)
    ).all()
    assert every["label"].tolist() == two["label"].tolist()
    with pytest.raises(SystemExit):
        predict_command(trained["ckpt"], trained["tree"], tmp_path / "k0.csv", "--topk", "0")


@pytest.mark.parametrize("which", ["ckpt", "onnx"])
def test_logit_output_softmaxes_to_the_probabilities(trained, exported, tmp_path, which):
    model = trained["ckpt"] if which == "ckpt" else exported["onnx"]
    common = ["-q", "--topk", "4"]
    assert predict_command(model, trained["tree"], tmp_path / "p.csv", *common) == 0
    assert (
        predict_command(
            model, trained["tree"], tmp_path / "l.csv", *common, "--output-type", "logit"
        )
        == 0
    )
    probs, logits = read_predictions(tmp_path / "p.csv"), read_predictions(tmp_path / "l.csv")
    assert list(logits.columns) == prediction_columns(4, "logit")
    assert "logit_4" in logits.columns and "probability" not in logits.columns
    assert logits["label"].tolist() == probs["label"].tolist()  # the same ranking
    expected = scores_by_class(probs, "probability", 4)
    np.testing.assert_allclose(softmax(scores_by_class(logits, "logit", 4)), expected, atol=2e-5)
    if which == "ckpt":  # the network's own logits, not log-probabilities
        raw = load_model(model).logits(trained["images"])
        assert not np.allclose(raw.max(axis=1), np.log(softmax(raw)).max(axis=1), atol=1e-3)


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_each_format_round_trips_the_same_rows(trained, tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    folder = mixed_folder(tmp_path / "in", trained)
    assert predict_command(trained["ckpt"], folder, tmp_path / "p.csv", "-q", "--topk", "3") == 0
    # By the suffix, and by --format whatever the suffix says.
    assert predict_command(trained["ckpt"], folder, tmp_path / f"p.{fmt}", "-q", "--topk", "3") == 0
    assert (
        predict_command(
            trained["ckpt"], folder, tmp_path / "p.out", "-q", "--topk", "3", "--format", fmt
        )
        == 0
    )
    reference = read_predictions(tmp_path / "p.csv")
    for path in (tmp_path / f"p.{fmt}", tmp_path / "p.out"):
        table = (
            pd.read_json(path, dtype=False, precise_float=True)
            if fmt == "json"
            else pd.read_parquet(path)
        )
        assert list(table.columns) == list(reference.columns) == prediction_columns(3)
        scores = [c for c in table.columns if c.startswith("probability")]
        for column in table.columns:
            if column in scores:
                expected = pd.to_numeric(reference[column].replace("", np.nan))
                np.testing.assert_array_equal(table[column].astype(float), expected)
            else:
                assert table[column].fillna("").astype(str).tolist() == reference[column].tolist()
    assert set(reference["rejected"]) == {
        "",
        "zero_byte",
        "unreadable",
        "too_small",
        "unsupported_extension",
    }


def test_parquet_without_pyarrow_is_one_line(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow fails as if not installed
    assert predict_command(trained["ckpt"], trained["tree"], tmp_path / "p.parquet") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgpipe: Parquet output needs pyarrow") and "\n" not in err
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1", "cpu:0"])
def test_a_bad_device_is_one_line(trained, exported, tmp_path, capsys, device):
    for model in (trained["ckpt"], exported["onnx"]):
        assert predict_command(model, trained["tree"], tmp_path / "p.csv", "--device", device) == 1
        assert capsys.readouterr().err.strip() == (
            f"imgpipe: device {device!r}: expected cpu, cuda or cuda:N (N a GPU number)"
        )


def test_an_absent_gpu_number_is_one_line(trained, tmp_path, capsys):
    code = predict_command(
        trained["ckpt"], trained["tree"], tmp_path / "p.csv", "--device", "cuda:7"
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert (
            err
            == f"imgpipe: device cuda:7: torch sees {count} CUDA device(s), numbered 0 to {count - 1}"
        )
    else:
        assert err == "imgpipe: device cuda:7: torch finds no usable CUDA device here"


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == f"imgpipe {project['version']}"


def test_workers_give_the_rows_of_one_thread_in_order(trained, tmp_path):
    folder = mixed_folder(tmp_path / "in", trained)
    model = load_model(trained["ckpt"])
    for workers in (0, 3):
        predict_files(model, folder, tmp_path / f"w{workers}.csv", batch_size=5, workers=workers)
    one, many = (tmp_path / "w0.csv").read_bytes(), (tmp_path / "w3.csv").read_bytes()
    assert one == many
    assert read_predictions(tmp_path / "w3.csv")["relpath"].is_monotonic_increasing


def test_decoding_stays_within_the_batches_in_flight(trained, tmp_path, monkeypatch):
    import threading

    from imgpipe.data import ingest
    from imgpipe.stages.predict import BATCHES_IN_FLIGHT, chunk_size

    decoded, lock, ahead = [0], threading.Lock(), []
    real_prepare = ingest.prepare_images

    def counting_prepare(*args, **kwargs):
        for item in real_prepare(*args, **kwargs):
            with lock:
                decoded[0] += 1
            yield item

    monkeypatch.setattr(ingest, "prepare_images", counting_prepare)
    model = load_model(trained["ckpt"])
    real_run, given = model.run, [0]

    def watching_run(images):
        given[0] += len(images)
        with lock:
            ahead.append(decoded[0] - given[0])
        return real_run(images)

    model.run = watching_run
    batch, workers = 8, 2
    summary = predict_files(
        model, trained["tree"], tmp_path / "p.csv", batch_size=batch, workers=workers
    )
    assert summary["predicted"] == given[0] == decoded[0] == 80
    bound = BATCHES_IN_FLIGHT * batch + chunk_size(batch, workers)
    assert len(ahead) == 10 and max(ahead) <= bound < 80, ahead


def test_no_lightning_and_progress_lines_unless_quiet(trained, exported, tmp_path):
    """A fresh process predicts a checkpoint and an ONNX file: Lightning is never imported."""
    code = (
        "import sys\n"
        "import imgpipe.core.logs\n"
        "imgpipe.core.logs.PROGRESS_SECONDS = 0.0  # a line per batch\n"
        "from imgpipe.cli import main\n"
        "assert main(sys.argv[1:]) == 0\n"
        "found = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'lightning', 'pytorch_lightning', 'lightning_fabric'})\n"
        "print('LIGHTNING', found)\n"
    )
    runs = {}
    for name, model, extra in (("ckpt", trained["ckpt"], []), ("onnx", exported["onnx"], ["-q"])):
        args = [str(model), str(trained["tree"]), "-o", str(tmp_path / f"{name}.csv")]
        proc = subprocess.run(
            [sys.executable, "-c", code, "predict", *args, "--batch-size", "16", *extra],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            },
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "LIGHTNING []" in proc.stdout, proc.stdout
        runs[name] = proc.stderr
    lines = [line.split(" ", 1)[1] for line in runs["ckpt"].splitlines() if " predict: " in line]
    assert any("files (" in line and "files/s" in line and "left" in line for line in lines), lines
    assert lines[-1].startswith("predict: 80/80 files in "), lines
    assert "predict: " not in runs["onnx"] and runs["onnx"].strip() == ""


def test_predict_rule_takes_its_settings_from_the_config(trained, tmp_path):
    out = tmp_path / "rule"
    settings = {
        "input": str(trained["tree"]),
        "name": "n",
        "topk": 2,
        "output_type": "logit",
        "format": "json",
        "batch_size": 16,
        "device": "cpu",
        "workers": 2,
    }
    job = StageJob(
        input={"model": str(trained["ckpt"]), "images": str(trained["tree"])},
        output={
            "predictions": str(out / "predictions.json"),
            "montage": str(out / "montage.png"),
            "metrics": str(out / "metrics.json"),
        },
        params={"settings": settings},
        threads=1,
    )
    summary = run_predict(job)
    assert summary["output"] == {
        "path": str(out / "predictions.json"),
        "format": "json",
        "output_type": "logit",
        "topk": 2,
    }
    table = pd.read_json(out / "predictions.json")
    assert list(table.columns) == prediction_columns(2, "logit") and len(table) == 80
    assert summary["device"] == "cpu" and summary["metrics"]["n_labelled"] == 80
