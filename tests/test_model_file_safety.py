"""A model file is data, never code: hostile and wrong model files give one line and run nothing.

One tiny model is trained once for the module (one epoch on 8 px digits); every
hostile or broken file is made from it. The crafted files of issue 19 are run
through ``python -m imgpipe.cli predict`` in a fresh process, as a user would.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY, digits_at
from helpers.workflow_utils import REPO, copy_workflow, digits_tree, planned_jobs, write_config

from imgpipe import cli
from imgpipe.core.errors import DataError
from imgpipe.infer.export import export_onnx, export_torchscript
from imgpipe.infer.inference import load_classifier, load_model
from imgpipe.infer.modelfile import METADATA_KEY, configured_factories, model_metadata, safe_hparams
from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.fit import fit
from imgpipe.stages.predict import rule_factories
from imgpipe.workflow.stage_job import StageJob

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(srun|LeafSpec|logging interval|on_after_batch_transfer|all_gather is deprecated)"
)
SIZE = 8
IMAGE = {"size": SIZE, "mode": "gray", "fit": "pad"}
CLASSES = ["zero", "one", "two"]
# A harmless factory that leaves a marker in the working directory when it is called.
FACTORY_MODULE = """
from pathlib import Path

from torch import nn


def make(num_classes, in_channels, image_size):
    Path("factory_ran").write_text("called")
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )
"""


class Payload:
    """An object whose unpickling would run code (here: record that it ran)."""

    ran = False

    def __reduce__(self):
        return (Payload._mark, ())

    @staticmethod
    def _mark():
        Payload.ran = True
        return "ran"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A model trained by ``fit`` (the file train_final writes), and a folder of 8 px PNGs."""
    base = tmp_path_factory.mktemp("real")
    images, labels = digits_at(SIZE, 90)
    labels = labels % 3
    ids = np.arange(len(images))
    model_cfg = {**copy.deepcopy(TINY["model"]), "channels": [4]}
    train_cfg = {**copy.deepcopy(TINY["train"]), "max_epochs": 1}
    fit(
        images,
        labels,
        ids[ids % 5 != 0],
        ids[ids % 5 == 0],
        None,
        None,
        model_cfg,
        train_cfg,
        base / "model",
        class_names=CLASSES,
        image_cfg=IMAGE,
    )
    folder = base / "images"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.png"), images[i, :, :, 0])
    return {"ckpt": base / "model" / "model.ckpt", "images": folder}


def read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_predict(model: Path, images: Path, cwd: Path, *extra: str, path: Path | None = None):
    """``python -m imgpipe.cli predict`` in a fresh process with ``cwd`` as working directory."""
    cwd.mkdir(parents=True, exist_ok=True)
    pythonpath = [str(REPO), *([str(path)] if path else [])]
    return subprocess.run(
        [sys.executable, "-m", "imgpipe.cli", "predict", str(model), str(images)]
        + ["-o", "out.csv", "-q", *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)},
        timeout=300,
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- the crafted files


def test_crafted_file_naming_a_shell_runs_nothing(real, tmp_path):
    # The file of issue 19: dicts, strings and ints only, in a real model file's structure.
    state = read(real["ckpt"])
    state["hyper_parameters"] = {
        **state["hyper_parameters"],
        "model_cfg": {"name": "os:spawnv"},
        "num_classes": 2,  # os.spawnv's mode: any value but P_NOWAIT waits for the command
        "in_channels": "/bin/sh",
        "image_size": ["sh", "-c", "id > marker"],
    }
    hostile = tmp_path / "model.ckpt"
    torch.save(state, hostile)
    proc = run_predict(hostile, real["images"], tmp_path / "run")
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith(f"imgpipe: {hostile}: ")
    assert not (tmp_path / "run" / "marker").exists()
    assert not (tmp_path / "run" / "out.csv").exists()


@pytest.fixture
def factory_file(real, tmp_path, monkeypatch):
    """A model built by a harmless factory that writes a marker, and the folder its module is in."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "marker_factory.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(modules))
    build = tmp_path / "build"
    build.mkdir()
    monkeypatch.chdir(build)  # building it here calls the factory: its marker stays here
    hparams = read(real["ckpt"])["hyper_parameters"]
    module = ImageClassifier(**{**hparams, "model_cfg": {"name": "marker_factory:make"}})
    state = read(real["ckpt"])
    state["state_dict"] = module.state_dict()
    state["hyper_parameters"] = dict(module.hparams)
    state[METADATA_KEY] = model_metadata(module.hparams)
    path = tmp_path / "model.ckpt"
    torch.save(state, path)
    (build / "factory_ran").unlink()
    return {"ckpt": path, "modules": modules}


def test_a_factory_named_by_the_file_alone_is_never_called(real, factory_file, tmp_path):
    run = tmp_path / "run"
    proc = run_predict(factory_file["ckpt"], real["images"], run, path=factory_file["modules"])
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "marker_factory:make" in line and "--model-factory marker_factory:make" in line
    assert not (run / "factory_ran").exists()

    named = ("--model-factory", "marker_factory:make")
    proc = run_predict(
        factory_file["ckpt"], real["images"], run, *named, path=factory_file["modules"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "factory_ran").exists() and (run / "out.csv").is_file()


def test_a_factory_named_at_load_time_must_be_the_files(real, factory_file, tmp_path, capsys):
    out = tmp_path / "p.csv"
    code = cli.main(
        ["predict", str(factory_file["ckpt"]), str(real["images"]), "-o", str(out)]
        + ["--model-factory", "other_module:make"]
    )
    assert code == 1
    line = one_line(capsys.readouterr().err)
    assert "marker_factory:make" in line and "other_module:make" in line
    assert not Path("factory_ran").exists()  # the working directory is the fixture's
    # The harmless smallcnn file with a factory named: refused too (the names must agree).
    code = cli.main(
        ["predict", str(real["ckpt"]), str(real["images"]), "-o", str(out)]
        + ["--model-factory", "marker_factory:make"]
    )
    assert code == 1
    assert "leave --model-factory out" in one_line(capsys.readouterr().err)


def test_load_model_takes_the_factory_as_an_argument(factory_file, tmp_path):
    with pytest.raises(DataError, match="never chooses code to run"):
        load_model(factory_file["ckpt"])
    assert not Path("factory_ran").exists()
    model = load_model(factory_file["ckpt"], model_factory="marker_factory:make")
    assert model.class_names == CLASSES and Path("factory_ran").exists()


# ----------------------------------------------------------------------------- every field checked


def hparams_with(real, **changes) -> dict:
    hparams = copy.deepcopy(read(real["ckpt"])["hyper_parameters"])
    for key, value in changes.items():
        if key.startswith("model_cfg."):
            hparams["model_cfg"][key.removeprefix("model_cfg.")] = value
        else:
            hparams[key] = value
    return hparams


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_cfg.name": "os:system"}, "never chooses code to run"),
        ({"model_cfg.name": "resnet9999"}, "no model imgpipe builds"),
        ({"model_cfg.name": "timm/hf-hub:evil/net"}, "timm has no such model"),
        ({"model_cfg.name": ["smallcnn"]}, "model_cfg.name is"),
        ({"in_channels": True}, "in_channels is True"),
        ({"in_channels": 2}, "in_channels is 2"),
        ({"in_channels": "/bin/sh"}, "in_channels is '/bin/sh'"),
        ({"image_size": 10**9}, r"image_size is 1000000000, expected an integer in \[4, 1024\]"),
        ({"image_size": 8.0}, "image_size is 8.0"),
        ({"image_size": ["sh", "-c", "id"]}, "image_size is"),
        ({"num_classes": "3"}, "num_classes is '3'"),
        ({"num_classes": 1}, "num_classes is 1"),
        ({"class_names": [0, 1, 2]}, "expected a list of distinct class names"),
        ({"class_names": ["a", "a", "b"]}, "distinct class names"),
        ({"class_names": ["a", "b"]}, "class_names has 2 names for 3 classes"),
        ({"model_cfg.channels": [-4]}, "model_cfg.channels is"),
        ({"model_cfg.channels": ["4"]}, "model_cfg.channels is"),
        ({"model_cfg.dropout": 1.5}, r"model_cfg.dropout is 1.5, expected a number in \[0, 1\)"),
        ({"model_cfg.dropout": True}, "model_cfg.dropout is True"),
        ({"mean": [0.1, 0.2, 0.3]}, "mean is .* expected 1 finite numbers"),
        ({"std": [0.0]}, "std is .* positive numbers"),
        ({"mean": ["x"]}, "mean is"),
        ({"image_cfg": {"size": 16, "mode": "gray", "fit": "pad"}}, "does not match image_size"),
        ({"image_cfg": {"size": 8, "mode": "cmyk", "fit": "pad"}}, "image_cfg.mode"),
        ({"extra": "x"}, "keys imgpipe never writes"),
        ({"train_cfg": ["lr"]}, "train_cfg is"),
    ],
)
def test_every_field_is_checked_before_anything_is_built(real, changes, message):
    with pytest.raises(DataError, match=message):
        safe_hparams(hparams_with(real, **changes))


def test_the_checked_fields_of_a_real_file_build_it_unchanged(real):
    hparams = read(real["ckpt"])["hyper_parameters"]
    safe = safe_hparams(hparams)
    assert safe["model_cfg"]["name"] == "smallcnn" and safe["model_cfg"]["weights"] is None
    assert (safe["num_classes"], safe["in_channels"], safe["image_size"]) == (3, 1, SIZE)
    assert safe["class_names"] == CLASSES and safe["image_cfg"] == IMAGE
    for name in ("resnet18", "timm/resnet18"):
        assert safe_hparams(hparams_with(real, **{"model_cfg.name": name}))["model_cfg"]["name"]


def test_tensors_must_fit_the_architecture(real, tmp_path):
    state = read(real["ckpt"])
    state["hyper_parameters"]["model_cfg"]["channels"] = [3]  # the weights are for [4]
    state[METADATA_KEY]["architecture"]["channels"] = [3]
    torch.save(state, tmp_path / "narrower.ckpt")
    with pytest.raises(DataError, match=r"narrower.ckpt: its tensors do not fit the smallcnn"):
        load_classifier(tmp_path / "narrower.ckpt")
    # Widths the file's tensors could not fill are refused before anything is built.
    state["hyper_parameters"]["model_cfg"]["channels"] = [8192] * 32
    torch.save(state, tmp_path / "huge.ckpt")
    with pytest.raises(DataError, match=r"need \d+ weights, the state_dict holds \d+"):
        load_classifier(tmp_path / "huge.ckpt")


# ----------------------------------------------------------------------------- wrong files: one line


def wrong_checkpoints(real, folder: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of wrong .ckpt and the words of its one line."""
    folder.mkdir()
    files = {}
    text = folder / "text.ckpt"
    text.write_text("this is no model\n")
    files["text"] = (text, "cannot be read as a model file: not a PyTorch checkpoint")
    foreign = folder / "foreign.ckpt"
    torch.save(
        {
            "state_dict": {"layer.weight": torch.zeros(2, 2)},
            "hyper_parameters": {"lr": 0.1, "hidden": 32},
            "epoch": 3,
            "pytorch-lightning_version": "2.5.0",
        },
        foreign,
    )
    files["foreign"] = (foreign, "not an imgpipe model file .*no model_cfg.*another Lightning")
    code = folder / "code.ckpt"
    state = read(real["ckpt"])
    state["extra"] = Payload()
    torch.save(state, code)
    files["pickle"] = (code, r"pickled Python object \(\w+\) that could run code")
    data = real["ckpt"].read_bytes()
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    files["truncated"] = (truncated, "truncated or corrupt")
    weights = folder / "weights.ckpt"
    torch.save({"conv.weight": torch.zeros(2)}, weights)
    files["weights only"] = (weights, "not an imgpipe model file")
    listing = folder / "list.ckpt"
    torch.save([1, 2, 3], listing)
    files["a list"] = (listing, "not an imgpipe model file")
    return files


def test_wrong_checkpoints_give_one_line(real, tmp_path, capsys):
    Payload.ran = False
    for kind, (path, message) in wrong_checkpoints(real, tmp_path / "wrong").items():
        code = cli.main(["predict", str(path), str(real["images"]), "-o", str(tmp_path / "p.csv")])
        line = one_line(capsys.readouterr().err)
        assert code == 1, kind
        assert line.startswith(f"imgpipe: {path}: "), (kind, line)
        assert re.search(message, line), (kind, line)
    assert not Payload.ran and not (tmp_path / "p.csv").exists()


@pytest.fixture(scope="module")
def exports(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    model = load_model(real["ckpt"])
    export_onnx(model, out / "model.onnx")
    export_torchscript(model, out / "model.pt")
    return {"onnx": out / "model.onnx", "pt": out / "model.pt"}


def copy_export(path: Path, folder: Path, name: str) -> Path:
    folder.mkdir(exist_ok=True)
    target = folder / name
    shutil.copy2(path, target)
    shutil.copy2(f"{path}.json", f"{target}.json")
    return target


def edit_sidecar(path: Path, edit) -> None:
    import json

    sidecar = Path(f"{path}.json")
    meta = json.loads(sidecar.read_text())
    edit(meta[METADATA_KEY])
    sidecar.write_text(json.dumps(meta))


def test_wrong_onnx_files_give_one_line(real, exports, tmp_path, capsys):
    folder = tmp_path / "onnx"
    cases = {}
    rgb = copy_export(exports["onnx"], folder, "rgb.onnx")
    edit_sidecar(rgb, lambda m: m["image"].update(mode="rgb"))
    cases[rgb] = r"the ONNX graph takes \[\['batch', 1, 8, 8\]\], its sidecar says .*3, 8, 8"
    larger = copy_export(exports["onnx"], folder, "larger.onnx")
    edit_sidecar(larger, lambda m: m["image"].update(size=16))
    cases[larger] = r"its sidecar says one input \[batch, 1, 16, 16\]"
    classes = copy_export(exports["onnx"], folder, "classes.onnx")
    edit_sidecar(classes, lambda m: m.update(class_names=["a", "b", "c", "d"]))
    cases[classes] = r"the ONNX graph gives \[\['batch', 3\]\], its sidecar names 4 classes"
    truncated = copy_export(exports["onnx"], folder, "truncated.onnx")
    truncated.write_bytes(exports["onnx"].read_bytes()[:300])
    cases[truncated] = "cannot be read as an ONNX model"
    garbage = copy_export(exports["onnx"], folder, "garbage.onnx")
    garbage.write_bytes(b"\x00garbage" * 50)
    cases[garbage] = "cannot be read as an ONNX model"
    bad_meta = copy_export(exports["onnx"], folder, "badmeta.onnx")
    edit_sidecar(bad_meta, lambda m: m["image"].update(size="8; rm -rf"))
    cases[bad_meta] = r"badmeta.onnx.json: imgpipe.image.size is '8; rm -rf'"
    not_json = copy_export(exports["onnx"], folder, "notjson.onnx")
    Path(f"{not_json}.json").write_text("{not json")
    cases[not_json] = "sidecar notjson.onnx.json is no JSON file"
    for path, message in cases.items():
        code = cli.main(["predict", str(path), str(real["images"]), "-o", str(tmp_path / "p.csv")])
        line = one_line(capsys.readouterr().err)
        assert code == 1, path
        assert line.startswith(f"imgpipe: {path}: "), line
        assert re.search(message, line), (path.name, line)


def test_torchscript_is_refused_unless_trusted(real, exports, tmp_path, capsys):
    out = tmp_path / "p.csv"
    args = ["predict", str(exports["pt"]), str(real["images"]), "-o", str(out), "-q"]
    assert cli.main(args) == 1
    line = one_line(capsys.readouterr().err)
    assert "a TorchScript file is a program" in line and "--trust-torchscript" in line
    assert "model.onnx is the safe alternative" in line and not out.exists()
    with pytest.raises(DataError, match="trust_torchscript=True"):
        load_model(exports["pt"])
    assert cli.main([*args, "--trust-torchscript"]) == 0 and out.is_file()
    assert load_model(exports["pt"], trust_torchscript=True).kind == "torchscript"


def test_model_factory_flag_takes_only_factory_names(capsys):
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["predict", "m", "i", "-o", "o", "--model-factory", "os.system"])
    assert "is not package.module:factory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the workflow's loads


def test_rules_trust_the_factories_the_users_config_names():
    config = {
        "model": {"name": "my_nets:make"},
        "sweep": {"grid": {"model.name": ["resnet18", "other_nets:build"], "train.lr": [0.1]}},
    }
    assert configured_factories(config) == ("my_nets:make", "other_nets:build")
    assert configured_factories({"model": {"name": "smallcnn"}}) == ()
    job = StageJob(
        input={},
        output={},
        params={"settings": {"input": "x", "name": "y", "model_factory": "extra_nets:make"}},
        config=config,
    )
    assert rule_factories(job) == ("extra_nets:make", "my_nets:make", "other_nets:build")


def test_predict_section_takes_a_model_factory(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    digits_tree(workdir / "data", per_class=4, classes=2)
    write_config(workdir, {"predict": {"input": "data", "name": "new", "model_factory": "a.b:c"}})
    assert planned_jobs(workdir, "predict")["predict"] == 1  # the config validates


# ----------------------------------------------------------------------------- smallcnn's stem


def saved_classifier(folder: Path, name: str, model_cfg: dict, size: int) -> Path:
    """A model file as training writes it (state dict, hyper-parameters, metadata)."""
    module = ImageClassifier(model_cfg, {}, 3, 3, size, [0.5] * 3, [0.25] * 3, class_names=CLASSES)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    state[METADATA_KEY] = model_metadata(state["hyper_parameters"])
    torch.save(state, folder / name)
    return folder / name


def test_a_model_file_from_before_the_stem_loads_in_its_own_layout(tmp_path):
    # Written before model.stem existed: no stem key, the blocks at full resolution.
    old_cfg = {"name": "smallcnn", "channels": [4, 8], "dropout": 0.0, "weights": None}
    torch.manual_seed(0)
    # An older release built it without a stem and wrote no stem key (ImageClassifier now
    # fills a missing key with the schema's default, auto).
    old = saved_classifier(tmp_path, "old.ckpt", {**old_cfg, "stem": "none"}, 96)
    state = read(old)
    del state["hyper_parameters"]["model_cfg"]["stem"]
    state[METADATA_KEY] = model_metadata(state["hyper_parameters"])
    torch.save(state, old)
    loaded = load_classifier(old)
    backbone = {k: tuple(v.shape) for k, v in loaded.model.backbone.state_dict().items()}
    assert backbone["0.weight"] == (4, 3, 3, 3) and backbone["7.weight"] == (8, 4, 3, 3)
    assert loaded.model.backbone[0].stride == (1, 1)
    x = torch.rand(2, 3, 96, 96)
    saved = read(old)["state_dict"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
    assert loaded(x).shape == (2, 3)
    # The same file with the stem the config now defaults to: its own layout, and it loads.
    new = saved_classifier(tmp_path, "new.ckpt", {**old_cfg, "stem": "auto"}, 96)
    assert load_classifier(new).model.backbone[0].stride == (2, 2)
    assert read(new)["hyper_parameters"]["model_cfg"]["stem"] == "auto"


def test_a_model_file_with_an_unknown_stem_is_refused(real):
    with pytest.raises(DataError, match="model_cfg.stem is 'patch', expected auto or none"):
        safe_hparams(hparams_with(real, **{"model_cfg.stem": "patch"}))
