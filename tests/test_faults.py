"""Faults: loaded files are read safely, and a DAG killed at any point resumes to the same results."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from imgpipe.dataset import load_images
from imgpipe.lightning import ImageClassifier, state_dict_only
from imgpipe.training import checkpoint_loads, load_classifier, resume_point


class Payload:
    """An object whose unpickling would run code (here: record that it ran)."""

    ran = False

    def __reduce__(self):
        return (Payload._mark, ())

    @staticmethod
    def _mark():
        Payload.ran = True
        return "ran"


def small_checkpoint(extra: object | None = None) -> dict:
    """A real checkpoint of a tiny classifier, optionally holding a pickled object."""
    module = ImageClassifier(
        {"name": "smallcnn", "channels": [4], "dropout": 0.0},
        {"lr": 0.01},
        num_classes=2,
        in_channels=1,
        image_size=8,
        mean=[0.5],
        std=[0.25],
    )
    state = {
        "state_dict": state_dict_only(module),
        "hyper_parameters": dict(module.hparams),
        "epoch": 0,
        "loops": {},
    }
    if extra is not None:
        state["extra"] = extra
    return state


def test_clean_checkpoint_loads(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(small_checkpoint(), path)
    module = load_classifier(path)
    assert module.model.head.out_features == 2


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(small_checkpoint(extra=Payload()), path)
    Payload.ran = False
    with pytest.raises(pickle.UnpicklingError):
        load_classifier(path)
    assert not Payload.ran


def test_resume_state_with_pickled_object_is_not_resumed(tmp_path):
    state_dir = tmp_path / "state"
    last = state_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save(small_checkpoint(extra=Payload()), last)
    Payload.ran = False
    assert not checkpoint_loads(last)
    assert resume_point(state_dir) == (None, None)
    assert not state_dir.exists() and not Payload.ran


def test_truncated_resume_state_starts_afresh(tmp_path):
    state_dir = tmp_path / "state"
    last = state_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save(small_checkpoint(), last)
    last.write_bytes(last.read_bytes()[:200])
    assert resume_point(state_dir) == (None, None)
    assert not state_dir.exists()


def shard_index(array_path, rows) -> pd.DataFrame:
    """A minimal clean index pointing at ``rows`` of one shard array."""
    n = len(rows)
    return pd.DataFrame(
        {
            "id": range(n),
            "path": [f"x/{i}.png" for i in range(n)],
            "relpath": [f"{i}.png" for i in range(n)],
            "label": ["a"] * n,
            "source": ["train"] * n,
            "sha256": ["0"] * n,
            "group": range(n),
            "shard": [0] * n,
            "row": rows,
            "array": [str(array_path)] * n,
        }
    )


def test_object_array_is_refused(tmp_path):
    path = tmp_path / "images.npy"
    objects = np.empty((2, 4, 4, 1), dtype=object)
    objects[...] = Payload()
    np.save(path, objects, allow_pickle=True)
    Payload.ran = False
    with pytest.raises(ValueError):
        load_images(shard_index(path, [0, 1]))
    assert not Payload.ran


def test_non_uint8_array_is_refused_not_cast(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.full((2, 4, 4, 1), 300.0))
    with pytest.raises(ValueError, match="uint8"):
        load_images(shard_index(path, [1, 0]))


def test_uint8_shard_rows_gathered_in_index_order(tmp_path):
    path = tmp_path / "images.npy"
    shard = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1)
    np.save(path, shard)
    np.testing.assert_array_equal(load_images(shard_index(path, [2, 0])), shard[[2, 0]])


# ---------------------------------------------------------------- resume is bit-identical


def fit_digits(out_dir, resume_dir=None, max_epochs=3, random=True):
    """Fit a tiny CNN on 3 digit classes (dropout and online augmentation on when ``random``)."""
    from imgpipe.demo import digits_images
    from imgpipe.training import fit

    images, labels = digits_images()
    keep = np.flatnonzero(labels < 3)[:90]
    images, labels = images[keep][..., None], labels[keep]
    ids = np.arange(len(labels))
    train_cfg = {
        "max_epochs": max_epochs,
        "batch_size": 16,
        "lr": 0.01,
        "schedule": "onecycle",
        "early_stopping_patience": 0,
        "seed": 3,
        "deterministic": True,
        "threads": 1,
        "online_augment": {"enabled": random, "hflip": True, "crop_padding": 2},
    }
    model_cfg = {"name": "smallcnn", "channels": [4, 8], "dropout": 0.3 if random else 0.0}
    return fit(
        images,
        labels,
        ids,
        ids[:0],  # no validation: model.ckpt is the last epoch
        None,
        None,
        model_cfg,
        train_cfg,
        out_dir,
        resume_dir=resume_dir,
    )


@pytest.mark.parametrize("random", [False, True])
def test_resumed_training_is_bit_identical(tmp_path, monkeypatch, random):
    fit_digits(tmp_path / "straight", random=random)
    original = ImageClassifier.on_train_epoch_start

    def killed_at_epoch_one(self):
        if self.current_epoch == 1:
            raise RuntimeError("killed")  # as a kill after epoch 0's last.ckpt
        original(self)

    state = tmp_path / "state"
    monkeypatch.setattr(ImageClassifier, "on_train_epoch_start", killed_at_epoch_one)
    with pytest.raises(RuntimeError, match="killed"):
        fit_digits(tmp_path / "resumed", resume_dir=state, random=random)
    assert (state / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.setattr(ImageClassifier, "on_train_epoch_start", original)
    summary = fit_digits(tmp_path / "resumed", resume_dir=state, random=random)
    assert summary["resumed_from_epoch"] == 0 and summary["attempts"] == 2
    assert not state.exists()
    straight = torch.load(tmp_path / "straight" / "model.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "model.ckpt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"]
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    history = [pd.read_csv(tmp_path / d / "history.csv") for d in ("straight", "resumed")]
    cols = ["epoch", "step", "train_loss"]
    pd.testing.assert_frame_equal(history[0][cols], history[1][cols])
