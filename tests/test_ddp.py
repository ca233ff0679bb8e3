"""Training under DDP (two CPU processes over gloo): exact validation metrics over uneven shards,
channels_last set before DDP wraps the model, the global batch and steps per epoch kept."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fit_on

from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.fit import fit

pytestmark = pytest.mark.filterwarnings("ignore:.*(LeafSpec|logging interval|srun)")


# ----------------------------------------------------------------------------- exact metrics over uneven shards


class PerfectClassifier(ImageClassifier):
    """Logits that are right by construction (the label is the image's brightness)."""

    def forward(self, x):
        label = (x.mean(dim=(1, 2, 3)) > 0).long()
        return self.model(x) * 0 + torch.nn.functional.one_hot(label, 2).float() * 10


def test_exact_val_metrics_under_ddp_with_uneven_shards(
    tmp_path, tiny_model, tiny_train, monkeypatch
):
    from imgpipe.learn import fit as training

    images = np.zeros((15, 8, 8, 1), np.uint8)
    labels = np.array([0, 1] * 7 + [1])
    images[labels == 1] = 255
    monkeypatch.setattr(training, "ImageClassifier", PerfectClassifier)
    cfg = {**tiny_train, "max_epochs": 1, "batch_size": 4, "threads": 2}
    # Five validation images on two processes: 3 and 2, all classified right.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = fit_on(
            (images, labels), np.arange(10), np.arange(10, 15), tiny_model, cfg, tmp_path, devices=2
        )
    assert summary["world_size"] == 2
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["val_acc"].tolist() == [1.0]
    assert summary["best_score"] == 1.0


def test_exact_val_metrics_under_ddp_with_wrong_predictions_on_uneven_shards(
    tmp_path, tiny_model, tiny_train, monkeypatch
):
    from imgpipe.learn import fit as training

    images = np.zeros((15, 8, 8, 1), np.uint8)
    labels = np.array([0, 1] * 5 + [0, 0, 0, 0, 1])
    images[labels == 1] = 255
    # Validation ids 10..14 are predicted 1, 0, 1, 0, 1 (brightness) and labelled 0, 0, 0, 0, 1.
    images[[10, 12]] = 255
    monkeypatch.setattr(training, "ImageClassifier", PerfectClassifier)
    cfg = {**tiny_train, "max_epochs": 1, "batch_size": 4, "threads": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_on(
            (images, labels), np.arange(10), np.arange(10, 15), tiny_model, cfg, tmp_path, devices=2
        )
    # Rank 0 holds ids 10, 12, 14 (1 of 3 right), rank 1 ids 11, 13 (2 of 2 right): 3 of 5
    # overall, where a mean of the ranks' (or of the batches') accuracies gives 2/3.
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["val_acc"].tolist() == [pytest.approx(0.6, abs=1e-7)]
    # Cross entropy with logits 10 / 0: ~0 when right, ~10 when wrong: 2 x 10 / 5 images.
    assert history["val_loss"].iloc[0] == pytest.approx(4.0, abs=1e-3)


# ----------------------------------------------------------------------------- channels_last before DDP


def telling_weights(model):
    """Conv weights whose layout shows: more than one input channel and a kernel above 1x1.

    (A weight with one input channel, like the first conv of a grey model, is
    contiguous in both layouts at once.)
    """
    weights = [
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[2:] != (1, 1)
    ]
    assert weights, "no conv weight tells the layouts apart"
    return weights


def channels_last(weight):
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_channels_last_is_set_before_ddp_wraps_the_model(
    tmp_path, tiny_model, tiny_train, digits16, monkeypatch, capfd
):
    from pytorch_lightning.strategies import DDPStrategy

    from imgpipe.learn import fit as training

    class ChannelsLast(ImageClassifier):
        """Asks for channels_last on the CPU (as on a GPU) and checks the weights' layout."""

        def setup(self, stage):
            self.channels_last = True
            super().setup(stage)

        def on_train_start(self):
            wrapped = self.trainer.strategy.model
            assert type(wrapped).__name__ == "DistributedDataParallel"
            assert all(map(channels_last, telling_weights(self.model)))

    wrap = DDPStrategy._setup_model

    def wrap_checked(strategy, model):
        # The layout DDP sees when it wraps the model is the one its gradient buckets take.
        assert all(map(channels_last, telling_weights(model))), (
            "DDP wrapped weights that are not channels_last yet"
        )
        return wrap(strategy, model)

    images, labels = digits16
    monkeypatch.setattr(training, "ImageClassifier", ChannelsLast)
    # Patched in the parent, inherited by the forked ranks.
    monkeypatch.setattr(DDPStrategy, "_setup_model", wrap_checked)
    cfg = {**tiny_train, "max_epochs": 1, "threads": 2}
    fit_on(
        (images, labels), np.arange(200), np.arange(200, 260), tiny_model, cfg, tmp_path, devices=2
    )
    # Converted after wrapping, DDP's gradient buckets no longer match the weights' strides.
    assert "Grad strides do not match bucket view strides" not in capfd.readouterr().err


def test_ddp_keeps_the_global_batch_and_the_steps_per_epoch(
    digits16, tmp_path, tiny_model, tiny_train
):
    images, labels = digits16
    cfg = {**tiny_train, "max_epochs": 1, "batch_size": 32, "threads": 2}
    one = fit_on((images, labels), np.arange(320), [], tiny_model, cfg, tmp_path / "one")
    two = fit(
        images, labels, np.arange(320), [], None, None, tiny_model, cfg, tmp_path / "two", devices=2
    )
    # batch_size is the global batch: 2 x 16 per step, the same 10 steps as one process.
    assert one["samples_per_rank"] == [320]
    assert two["samples_per_rank"] == [160, 160]
    steps = [pd.read_csv(tmp_path / run / "history.csv")["step"].iloc[-1] for run in ("one", "two")]
    assert steps[0] == steps[1] == 9  # the step count at the epoch's end, from 0
