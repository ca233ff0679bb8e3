"""Real photos at real resolution: a 96 px RGB tree through ingest and ``fit`` with standard backbones.

The tree (300 JPEGs, 3 classes) is listed and ingested with imgpipe's own
functions (``image.size: auto`` -> 96 px rgb), then trained through
``imgpipe.learn.fit.fit`` as the training rules do: resnet18 with its standard
stem from a local weights file the test writes (torchvision's random init,
saved with torch.save, as a user saves downloaded weights), a frozen backbone
that stays bit-identical, a timm model, and weights files that do not fit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.imagefactory import write_jpeg
from torch import nn
from torchvision import models as tvm

from imgpipe.core.errors import DataError
from imgpipe.data.dataset import ShardImages, label_codes
from imgpipe.data.image_settings import resolve_settings
from imgpipe.data.ingest import index_shard
from imgpipe.data.listing import list_images
from imgpipe.infer.inference import load_classifier, predict_proba
from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.fit import fit

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(srun|LeafSpec|logging interval|on_after_batch_transfer|all_gather is deprecated"
    "|in eval mode at the start of training)"
)
CLASSES = ("red", "green", "blue")
PER_CLASS = 100
TRAIN = {
    "max_epochs": 1,
    "min_steps": 0,
    "batch_size": 32,
    "lr": 0.003,
    "schedule": "none",
    "early_stopping_patience": 0,
    "label_smoothing": 0.0,
    "threads": 2,
    "seed": 0,
}


def colour_photo(rng: np.random.Generator, hue: int) -> np.ndarray:
    """A 96 px RGB picture dominated by one channel: soft blobs with grain."""
    coarse = rng.integers(0, 120, (6, 6, 3)).astype(np.float32)
    coarse[:, :, hue] += 120
    image = torch.nn.functional.interpolate(
        torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(96, 96), mode="bicubic"
    )[0].permute(1, 2, 0)
    image = image.numpy() + rng.normal(0, 6, (96, 96, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The ingested tree: (ShardImages, labels, train ids, val ids, image settings)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for hue, name in enumerate(CLASSES):
        for k in range(PER_CLASS):
            write_jpeg(root / "tree" / name / f"{k:03d}.jpg", colour_photo(rng, hue))
    files = list_images(root / "tree", [".jpg"])
    files.to_csv(root / "files.csv", index=False)
    settings = resolve_settings(
        {"size": "auto", "mode": "auto", "fit": "pad"}, files["path"].tolist()
    )
    stats = index_shard(files, 0, 1, settings, 10**8, root / "stats.csv", root / "images.npy")
    index = pd.DataFrame(
        {"label": stats["label"], "array": str(root / "images.npy"), "row": stats["row"]}
    )
    order = np.random.default_rng(1).permutation(len(index))
    return (
        ShardImages(index),
        label_codes(index),
        np.sort(order[60:]),
        np.sort(order[:60]),
        settings,
    )


def resnet18_weights(path) -> dict:
    """Save torchvision resnet18's random init (with its ImageNet head) as a weights file."""
    torch.manual_seed(0)
    state = tvm.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


def backbone_state(checkpoint) -> dict[str, torch.Tensor]:
    """The backbone's tensors of an imgpipe model.ckpt, keyed as in a torchvision state dict."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "model.backbone."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def train(photos, out, model_cfg, train_cfg=None):
    images, labels, train_ids, val_ids, settings = photos
    return fit(
        images,
        labels,
        train_ids,
        val_ids,
        None,
        None,
        model_cfg,
        {**TRAIN, **(train_cfg or {})},
        out,
        augment_cfg={"on_device": True, "crop_area": [0.5, 1.0], "hflip": True},
        class_names=list(CLASSES),
        image_cfg={k: settings[k] for k in ("size", "mode", "fit")},
    )


def test_the_tree_is_ingested_at_96_px_rgb(photos):
    images, labels, _, _, settings = photos
    assert (settings["size"], settings["mode"]) == (96, "rgb")
    assert images.shape == (300, 96, 96, 3) and np.bincount(labels).tolist() == [100] * 3


@pytest.mark.slow  # every layer's backward at 96 px: ~20-40 s on 2 cores
def test_resnet18_fine_tunes_from_a_local_weights_file_with_its_standard_stem(photos, tmp_path):
    file_state = resnet18_weights(tmp_path / "resnet18.pth")
    model_cfg = {"name": "resnet18", "weights": str(tmp_path / "resnet18.pth"), "dropout": 0.0}
    summary = train(photos, tmp_path / "out", model_cfg, {"backbone_lr_mult": 0.1})
    assert summary["epochs"] == 1 and summary["train_images"] == 240
    module = load_classifier(tmp_path / "out" / "model.ckpt")
    stem = module.model.backbone
    assert stem.conv1.kernel_size == (7, 7) and stem.conv1.stride == (2, 2)
    assert isinstance(stem.maxpool, nn.MaxPool2d)
    assert module.hparams.image_cfg == {"size": 96, "mode": "rgb", "fit": "pad"}
    trained = backbone_state(tmp_path / "out" / "model.ckpt")
    # Started from the file (the same keys but its head), then fine-tuned.
    assert set(trained) == {k for k in file_state if not k.startswith("fc.")}
    assert not torch.equal(trained["layer1.0.conv1.weight"], file_state["layer1.0.conv1.weight"])
    probs = predict_proba(tmp_path / "out" / "model.ckpt", photos[0], ids=photos[3])
    assert probs.shape == (60, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_frozen_backbone_gets_no_gradient_and_stays_bit_identical(photos, tmp_path, monkeypatch):
    file_state = resnet18_weights(tmp_path / "resnet18.pth")
    grads: list[tuple[bool, bool]] = []

    def record(module):  # after every backward: did any backbone / head parameter get a gradient?
        backbone = any(p.grad is not None for p in module.model.backbone.parameters())
        head = all(p.grad is not None for p in module.model.head.parameters())
        grads.append((backbone, head))

    monkeypatch.setattr(ImageClassifier, "on_after_backward", record, raising=False)
    model_cfg = {"name": "resnet18", "weights": str(tmp_path / "resnet18.pth"), "dropout": 0.0}
    train(photos, tmp_path / "out", model_cfg, {"freeze": "backbone", "lr": 0.05})
    assert grads and all(g == (False, True) for g in grads), grads
    trained = backbone_state(tmp_path / "out" / "model.ckpt")
    for key, value in trained.items():  # weights and batch-norm statistics alike
        assert torch.equal(value, file_state[key]), key
    head = torch.load(tmp_path / "out" / "model.ckpt", weights_only=True)["state_dict"]
    assert head["model.head.weight"].shape == (3, 512)


def test_a_timm_model_trains_on_the_photos(photos, tmp_path):
    summary = train(photos, tmp_path / "out", {"name": "timm/resnet10t", "dropout": 0.0})
    assert summary["epochs"] == 1 and np.isfinite(summary["best_score"])
    module = load_classifier(tmp_path / "out" / "model.ckpt")
    assert type(module.model.backbone).__module__.startswith("timm.")


def test_a_missing_weights_file_stops_fit_naming_the_file(photos, tmp_path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(DataError, match=f"model.weights: {missing} not found"):
        train(photos, tmp_path / "out", {"name": "resnet18", "weights": str(missing)})
    assert not (tmp_path / "out" / "model.ckpt").exists()


def test_a_mismatched_weights_file_stops_fit_naming_the_file_and_the_keys(photos, tmp_path):
    state = resnet18_weights(tmp_path / "resnet18.pth")
    state.pop("layer4.1.bn2.weight")
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(state, tmp_path / "resnet18.pth")
    with pytest.raises(DataError) as err:
        train(
            photos,
            tmp_path / "out",
            {"name": "resnet18", "weights": str(tmp_path / "resnet18.pth")},
        )
    message = str(err.value)
    assert str(tmp_path / "resnet18.pth") in message
    assert "layer4.1.bn2.weight" in message and "layer1.0.conv1.weight" in message
