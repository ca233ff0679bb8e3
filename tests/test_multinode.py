"""Issue 19 section 4: multi-node and fold edge cases that crashed or mislabelled.

The cv ones (group counts, empty folds) are in test_cv.py, the DDP metrics and
channels_last ones in test_ddp.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fit_on

from imgpipe.learn import fit as training
from imgpipe.learn.classifier_module import ImageClassifier

pytestmark = pytest.mark.filterwarnings("ignore:.*(LeafSpec|logging interval|srun)")


# ----------------------------------------------------------------------------- one process in SLURM


def test_one_process_fit_inside_a_multi_task_allocation(
    digits16, tmp_path, monkeypatch, tiny_model, tiny_train
):
    # A local-executor job inside `sbatch --ntasks=2`: Lightning's SLURMEnvironment
    # would refuse any fit ("You set `--ntasks=2` ..."), the 1-device one included.
    for key, value in {
        "SLURM_JOB_ID": "77",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NAME": "train",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    images, labels = digits16
    cfg = {**tiny_train, "max_epochs": 1}
    summary = fit_on(
        (images, labels), np.arange(200), np.arange(200, 260), tiny_model, cfg, tmp_path, devices=1
    )
    assert summary["strategy"] == "auto" and summary["world_size"] == 1
    assert (tmp_path / "model.ckpt").is_file()


# ----------------------------------------------------------------------------- fewer val images than ranks


class BrightnessClassifier(ImageClassifier):
    """Predicts class 1 for bright images, 0 for dark ones, whatever the label says."""

    def forward(self, x):
        label = (x.mean(dim=(1, 2, 3)) > 0).long()
        return self.model(x) * 0 + torch.nn.functional.one_hot(label, 2).float() * 10


def test_ddp_with_fewer_validation_images_than_processes(
    tmp_path, tiny_model, tiny_train, monkeypatch
):
    images = np.zeros((11, 8, 8, 1), np.uint8)
    labels = np.array([0, 1] * 5 + [0])
    images[1:10:2] = 255
    images[10] = 255  # the one validation image: predicted 1, labelled 0
    monkeypatch.setattr(training, "ImageClassifier", BrightnessClassifier)
    cfg = {**tiny_train, "max_epochs": 1, "batch_size": 4, "threads": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = fit_on(
            (images, labels), np.arange(10), [10], tiny_model, cfg, tmp_path, devices=2
        )
    # Rank 1 holds no validation image: it adds nothing, the one image of rank 0 counts.
    assert summary["world_size"] == 2
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["val_acc"].tolist() == [0.0]
    assert history["val_loss"].iloc[0] == pytest.approx(10.0, abs=1e-3)


# ----------------------------------------------------------------------------- last.ckpt every epoch


class StalledMetric(ImageClassifier):
    """val_acc never improves after epoch 0 (constant predictions); training itself goes on.

    Records the epoch last.ckpt holds at the end of each epoch, and can fail at
    the start of an epoch (a kill) to be resumed.
    """

    last_epochs: list[int] = []
    fail_at_epoch: int | None = None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(torch.zeros_like(y), y)
        self.log("val_acc", self.val_acc, on_step=False, on_epoch=True)

    def record_last_epoch(self):
        last = Path(self.trainer.checkpoint_callback.dirpath) / "last.ckpt"
        StalledMetric.last_epochs.append(int(torch.load(last, weights_only=True)["epoch"]))

    def on_train_epoch_start(self):
        # The checkpoints of an epoch are written after its own epoch-end hooks.
        if self.current_epoch > 0:
            self.record_last_epoch()
        if self.current_epoch == StalledMetric.fail_at_epoch:
            raise RuntimeError("killed")

    def on_fit_end(self):
        self.record_last_epoch()


def test_last_checkpoint_follows_every_epoch_and_resume_is_exact(
    digits16, tmp_path, monkeypatch, tiny_model, tiny_train
):
    images, labels = digits16
    monkeypatch.setattr(training, "ImageClassifier", StalledMetric)
    monkeypatch.setattr(StalledMetric, "last_epochs", [])
    cfg = {**tiny_train, "max_epochs": 4, "early_stopping_patience": 0}
    data, train_ids, val_ids = (images, labels), np.arange(300), np.arange(300, 360)
    whole = fit_on(data, train_ids, val_ids, tiny_model, cfg, tmp_path / "whole")
    # Lightning's save_last rewrote last.ckpt only with best.ckpt: [0, 0, 0, 0] here.
    assert StalledMetric.last_epochs == [0, 1, 2, 3]
    assert whole["best_epoch"] == 0

    resume_dir = tmp_path / "resume"
    monkeypatch.setattr(StalledMetric, "fail_at_epoch", 3)
    with pytest.raises(RuntimeError, match="killed"):
        fit_on(data, train_ids, val_ids, tiny_model, cfg, tmp_path / "cut", resume_dir=resume_dir)
    monkeypatch.setattr(StalledMetric, "fail_at_epoch", None)
    monkeypatch.setattr(StalledMetric, "last_epochs", [])
    resumed = fit_on(
        data, train_ids, val_ids, tiny_model, cfg, tmp_path / "cut", resume_dir=resume_dir
    )
    # Killed after epoch 2, which did not improve: the rerun goes on from epoch 2, not 0.
    assert resumed["resumed_from_epoch"] == 2
    assert StalledMetric.last_epochs == [2, 3]
    first, second = (pd.read_csv(tmp_path / run / "history.csv") for run in ("whole", "cut"))
    assert second["attempt"].tolist() == [0, 0, 0, 1]
    assert first["train_loss"].tolist() == second["train_loss"].tolist()
    weights = [
        torch.load(tmp_path / run / "model.ckpt", weights_only=True)["state_dict"]
        for run in ("whole", "cut")
    ]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
