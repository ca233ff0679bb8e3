"""Pretrained weights by name (model.weights: imagenet, timm tags), read offline from a seeded cache.

Nothing here downloads: TORCH_HOME and HF_HOME point at temporary folders
seeded with locally saved state dicts under the libraries' own file names, and
HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import json
import re
import urllib.error
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import torch
from helpers.workflow_utils import REPO, copy_workflow, digits_tree, snakemake, write_config
from safetensors.torch import save_file
from torchvision import models as tvm

from imgpipe.core.atomic import file_sha256
from imgpipe.core.errors import DataError
from imgpipe.learn import pretrained
from imgpipe.learn.factory import build_model, normalisation
from imgpipe.learn.models import IMAGENET_MEAN
from imgpipe.stages.weights import run_fetch_weights
from imgpipe.workflow.config import ConfigError, check_config, load_schema
from imgpipe.workflow.settings import fill_defaults
from imgpipe.workflow.stage_job import StageJob

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1
TIMM_TAG = "resnet10t.c3_in1k"  # timm's default (and only) tag of resnet10t
REVISION = "0123456789abcdef0123456789abcdef01234567"
SCHEMA = load_schema(REPO / "config" / "schema.yaml")


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty torch.hub and Hugging Face caches in tmp_path, offline."""
    torch_home, hf_home = tmp_path / "torch", tmp_path / "hf"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"torch": torch_home, "hf": hf_home}


def seed_torchvision(caches: dict[str, Path]) -> dict[str, torch.Tensor]:
    """A random resnet18 state dict saved as torchvision's own weights file."""
    torch.manual_seed(7)
    state = tvm.resnet18(weights=None).state_dict()
    folder = caches["torch"] / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / RESNET18_FILE)
    return state


def seed_timm(caches: dict[str, Path], tag: str = TIMM_TAG) -> dict[str, torch.Tensor]:
    """A random timm state dict in the hub cache's layout (refs/main -> snapshots/<rev>/)."""
    torch.manual_seed(8)
    state = timm.create_model(tag.split(".")[0]).state_dict()
    repo = caches["hf"] / "hub" / f"models--timm--{tag}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    return state


def assert_backbone_is(model, reference: dict[str, torch.Tensor], head: str) -> None:
    """Every backbone tensor is the file's; the file's classifier is not in the model."""
    state = model.backbone.state_dict()
    shared = [k for k in reference if k in state]
    assert shared and all(torch.equal(state[k], reference[k]) for k in shared)
    assert {k for k in reference if k not in state} == {f"{head}.weight", f"{head}.bias"}


# ---------------------------------------------------------------- building from the cache


def test_imagenet_builds_torchvision_resnet18_from_the_torch_hub_cache(caches):
    reference = seed_torchvision(caches)
    model = build_model("resnet18", 5, 3, 64, weights="imagenet")
    assert_backbone_is(model, reference, "fc")
    assert model.head.out_features == 5


@pytest.mark.parametrize("weights", ["imagenet", f"timm/{TIMM_TAG}", "timm/resnet10t"])
def test_timm_names_build_from_the_hugging_face_cache(caches, weights):
    reference = seed_timm(caches)
    model = build_model("timm/resnet10t", 3, 3, 64, weights=weights)
    assert_backbone_is(model, reference, "fc")
    assert model.head.out_features == 3


def test_torchvision_densenet_file_with_its_old_key_names_loads(caches):
    """torchvision's DenseNet files say ``norm.1`` where the model says ``norm1``."""
    torch.manual_seed(10)
    reference = tvm.densenet121(weights=None).state_dict()
    # The file predates batch norm's num_batches_tracked, as torchvision's own does.
    old = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in reference.items()
        if not k.endswith("num_batches_tracked")
    }
    assert old.keys() != reference.keys()
    folder = caches["torch"] / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    filename = pretrained.resolve("densenet121", "imagenet").filename
    torch.save(old, folder / filename)
    model = build_model("densenet121", 3, 3, 64, weights="imagenet")
    assert_backbone_is(model, reference, "classifier")


def test_a_local_path_still_loads_as_before(caches, tmp_path):
    torch.manual_seed(9)
    reference = tvm.resnet18(weights=None).state_dict()
    torch.save(reference, tmp_path / "mine.pth")
    assert_backbone_is(
        build_model("resnet18", 4, 3, 64, weights=tmp_path / "mine.pth"), reference, "fc"
    )


def test_named_weights_normalise_with_imagenet_statistics():
    mean, _ = normalisation({"weights": "imagenet", "normalize": "auto"}, 3, [0.1] * 3, [0.2] * 3)
    assert mean == list(IMAGENET_MEAN)


# ---------------------------------------------------------------- a missing file: one line


def test_missing_torchvision_file_names_file_cache_path_and_url(caches):
    with pytest.raises(DataError) as err:
        build_model("resnet18", 5, 3, 64, weights="imagenet")
    message = str(err.value)
    folder = caches["torch"] / "hub" / "checkpoints"
    assert "\n" not in message
    assert message.startswith(
        f"model.weights: imagenet for resnet18 needs {RESNET18_FILE} in {folder}/"
    )
    assert f"https://download.pytorch.org/models/{RESNET18_FILE}" in message


def test_missing_timm_file_names_the_repository_folder(caches):
    spec = pretrained.resolve("timm/resnet10t", "imagenet")
    with pytest.raises(DataError) as err:
        pretrained.local_file("timm/resnet10t", "imagenet")
    message = str(err.value)
    assert "\n" not in message and "model.safetensors" in message
    assert str(caches["hf"] / "hub" / f"models--timm--{TIMM_TAG}") in message
    assert f"hf download timm/{TIMM_TAG}" in message
    assert spec.slug == f"timm-{TIMM_TAG}"


def test_offline_switch_reports_the_missing_file_and_is_quiet_once_cached(caches):
    files = pretrained.needed_files(
        fill_defaults({"model": {"name": "resnet18", "weights": "imagenet"}}, check=False)
    )
    error = pretrained.missing_offline_error(files)
    assert error and "HF_HUB_OFFLINE is set" in error and RESNET18_FILE in error
    seed_torchvision(caches)
    assert pretrained.missing_offline_error(files) is None


def test_a_failed_download_gives_the_one_line(caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    spec = pretrained.resolve("resnet18", "imagenet")
    with pytest.raises(DataError) as err:
        pretrained.fetch(spec)
    message = str(err.value)
    assert "\n" not in message and RESNET18_FILE in message
    assert "fetch failed (URLError" in message and "copy it there" in message


def test_fetch_records_a_cached_file_without_downloading(caches, tmp_path, monkeypatch):
    seed_torchvision(caches)
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)
    spec = pretrained.resolve("resnet18", "imagenet")
    job = StageJob(
        params={"weights": asdict(spec)},
        output={"record": str(tmp_path / "record.json")},
    )
    run_fetch_weights(job)
    record = json.loads((tmp_path / "record.json").read_text())
    cached = caches["torch"] / "hub" / "checkpoints" / RESNET18_FILE
    assert record["path"] == str(cached) and record["source"] == "torchvision"
    assert record["sha256"] == file_sha256(cached) and record["downloaded"] is False


# ---------------------------------------------------------------- config validation


def config_with(model: dict, sweep: dict | None = None) -> dict:
    """The smallest config check_config sees, with this model (and sweep) section."""
    config = {"data": {"root": "data"}, "model": model}
    if sweep:
        config["sweep"] = {"enabled": True, "method": "grid", **sweep}
    return config


@pytest.mark.parametrize(
    "model",
    [
        {"name": "resnet18", "weights": "imagenet"},
        {"name": "timm/resnet18", "weights": "imagenet"},
        {"name": "timm/resnet18", "weights": "timm/resnet18.a1_in1k"},
        {"name": "smallcnn", "weights": "some/local/file.pth"},
    ],
)
def test_config_accepts_names_tags_and_paths(model):
    check_config(config_with(model), SCHEMA)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            {"name": "timm/resnet18", "weights": "timm/resnet50.a1_in1k"},
            "model.weights: timm/resnet50.a1_in1k is a tag of timm/resnet50, "
            "not of model.name timm/resnet18",
        ),
        (
            {"name": "resnet18", "weights": "timm/resnet18.a1_in1k"},
            "model.weights: timm/resnet18.a1_in1k is a timm tag: it needs model.name timm/<arch>",
        ),
        (
            {"name": "timm/resnet18", "weights": "timm/resnet18.a1_in2k"},
            "model.weights: timm has no pretrained tag timm/resnet18.a1_in2k for timm/resnet18; "
            "close: timm/resnet18.a1_in1k",
        ),
        (
            {"name": "smallcnn", "weights": "imagenet"},
            "model.name smallcnn has no pretrained weights",
        ),
    ],
)
def test_config_refuses_a_name_that_fits_no_model_in_one_line(model, expected):
    with pytest.raises(ConfigError) as err:
        check_config(config_with(model), SCHEMA)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and expected in lines[1]


def test_sweep_grid_names_and_weights_are_checked_pair_by_pair():
    grid = {"model.name": ["resnet18", "smallcnn"], "model.weights": ["imagenet"]}
    with pytest.raises(ConfigError, match="smallcnn has no pretrained weights"):
        check_config(config_with({"name": "resnet18"}, {"grid": grid}), SCHEMA)
    grid = {"model.name": ["resnet18", "timm/resnet10t"], "model.weights": ["imagenet"]}
    files = pretrained.needed_files(
        fill_defaults(config_with({"name": "smallcnn"}, {"grid": grid}), check=False)
    )
    assert sorted(files) == [f"timm-{TIMM_TAG}", "torchvision-resnet18-f37072fd"]


def test_a_random_sweeps_choices_count_too():
    ranges = {"train.lr": [0.001, 0.1], "model.weights": [None, "imagenet"]}
    config = config_with({"name": "resnet18"}, {"method": "random", "ranges": ranges})
    assert pretrained.named_pairs(fill_defaults(config, check=False)) == [("resnet18", "imagenet")]


def test_a_timm_pytorch_model_bin_in_the_cache_is_found(caches):
    seed_timm(caches)
    snapshot = caches["hf"] / "hub" / f"models--timm--{TIMM_TAG}" / "snapshots" / REVISION
    (snapshot / "model.safetensors").rename(snapshot / "pytorch_model.bin")
    spec = pretrained.resolve("timm/resnet10t", "imagenet")
    assert pretrained.cached_file(spec) == snapshot / "pytorch_model.bin"


def test_timm_weights_published_only_as_a_url_go_to_the_torch_hub_cache(caches):
    spec = pretrained.resolve("timm/gcvit_xxtiny", "imagenet")
    assert spec.source == "timm-url" and spec.url.endswith("/" + spec.filename)
    folder = caches["torch"] / "hub" / "checkpoints"
    assert pretrained.cached_file(spec) is None and f"in {folder}/" in pretrained.missing_message(
        spec
    )
    folder.mkdir(parents=True)
    (folder / spec.filename).write_bytes(b"")
    assert pretrained.cached_file(spec) == folder / spec.filename


def test_no_named_weights_need_no_file():
    assert (
        pretrained.needed_files(
            fill_defaults(config_with({"name": "resnet18", "weights": "x.pth"}), check=False)
        )
        == {}
    )
    assert (
        pretrained.needed_files(fill_defaults(config_with({"name": "resnet18"}), check=False)) == {}
    )


# ---------------------------------------------------------------- the workflow's start-up


@pytest.fixture
def tiny_workflow(tmp_path) -> Path:
    """A copy of the workflow with a 4-class digits tree, no sweep, resnet18 at 16 px."""
    workdir = copy_workflow(tmp_path / "wf")
    digits_tree(workdir / "data", per_class=12)
    write_config(
        workdir,
        {
            "data": {"root": "data"},
            "image": {"size": 16},
            "model": {"name": "resnet18", "weights": "imagenet"},
            "train": {"max_epochs": 1, "min_steps": 0, "batch_size": 16, "threads": 1},
            "sweep": {"enabled": False},
            "cv": {"k": 2},
        },
    )
    return workdir


FINAL = "results/train/final/model.ckpt"


def test_startup_stops_offline_with_the_one_line(caches, tiny_workflow):
    proc = snakemake(tiny_workflow, "-n", FINAL, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    line = next(x for x in output.splitlines() if "model.weights: imagenet for resnet18" in x)
    assert f"needs {RESNET18_FILE} in {caches['torch']}/hub/checkpoints/" in line
    assert "HF_HUB_OFFLINE is set" in line and "Traceback" not in output


def test_the_fetch_rule_records_the_cache_file_and_training_waits_for_it(caches, tiny_workflow):
    seed_torchvision(caches)
    dry = snakemake(tiny_workflow, "-n", FINAL).stdout
    assert "fetch_weights" in dry and "train_final" in dry
    # The fetch job alone, for real (the file is cached: nothing is downloaded).
    record = "results/weights/torchvision-resnet18-f37072fd.json"
    snakemake(tiny_workflow, record)
    cached = caches["torch"] / "hub" / "checkpoints" / RESNET18_FILE
    written = json.loads((tiny_workflow / record).read_text())
    assert written["path"] == str(cached) and written["sha256"] == file_sha256(cached)
    assert "fetch_weights" not in snakemake(tiny_workflow, "-n", FINAL).stdout
    # A file gone from the cache: its record is forgotten, and the rule runs again.
    cached.unlink()
    with pytest.MonkeyPatch.context() as online:
        online.delenv("HF_HUB_OFFLINE")
        assert "fetch_weights" in snakemake(tiny_workflow, "-n", FINAL).stdout
    assert not (tiny_workflow / record).exists()


def test_without_named_weights_no_fetch_job(caches, tiny_workflow):
    write_config(tiny_workflow, {"model": {"weights": None}})
    assert "fetch_weights" not in snakemake(tiny_workflow, "-n", FINAL).stdout
