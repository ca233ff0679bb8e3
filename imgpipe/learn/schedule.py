"""The training schedule in optimizer steps as well as epochs: a job's batch size and epoch count.

A schedule given only in epochs gives a small data set almost no training: at
batch 128, 120 training images are one optimizer step per epoch, and 10 epochs
are 10 steps. Two settings size it in steps instead:

- ``train.batch_size: auto``: an eighth of the images, rounded down to a power
  of two, within [16, 128]. At least 8 steps per epoch wherever the data allow
  (128+ images); never under 16 (batch-norm statistics of a handful of images
  are noise); never over 128, the fixed default before, so a data set of 1,024
  images or more trains exactly as it did. The power of two keeps nearby sizes
  on one batch size, and the learning rate the sweep tuned with it.
- ``train.min_steps``: epochs = max(max_epochs, ceil(min_steps / steps per epoch)).

Every job of a run (sweep trials, CV folds, the final model) is sized on the
same image count: the training pool (train + val roles), what the final model
trains on. They therefore share one batch size and one number of epochs: the
final model and the folds run the schedule the trials were scored at the end
of; their step counts differ only with their image counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from imgpipe.workflow import settings

AUTO_BATCH_MIN = 16
AUTO_BATCH_MAX = 128
# batch_size auto aims at this many optimizer steps per epoch.
AUTO_STEPS_PER_EPOCH = 8


def auto_batch_size(n_images: int) -> int:
    """``batch_size: auto``: n_images / 8 rounded down to a power of two, clamped to [16, 128]."""
    target = max(1, int(n_images) // AUTO_STEPS_PER_EPOCH)
    power = 1 << (target.bit_length() - 1)
    return min(AUTO_BATCH_MAX, max(AUTO_BATCH_MIN, power))


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimizer steps of one epoch over ``n_images`` (a ragged last batch is dropped, as training does)."""
    return max(1, int(n_images) // int(batch_size))


def batch_size_for(train_cfg: Mapping[str, Any], n_images: int) -> int:
    """The configured batch size, or the ``auto`` rule's for ``n_images``."""
    batch = train_cfg["batch_size"]
    return auto_batch_size(n_images) if batch == "auto" else int(batch)


def epochs_for(train_cfg: Mapping[str, Any], n_images: int, batch_size: int) -> int:
    """``max_epochs``, stretched until the schedule holds ``min_steps`` optimizer steps."""
    epochs = int(train_cfg["max_epochs"])
    min_steps = int(train_cfg["min_steps"])
    return max(epochs, math.ceil(min_steps / steps_per_epoch(n_images, batch_size)))


def sized_schedule(train_cfg: Mapping[str, Any], n_images: int | None = None) -> dict[str, Any]:
    """``train_cfg`` with ``batch_size`` and ``max_epochs`` resolved for its schedule's image count.

    The count is ``schedule_images`` when set (the training pool, set by
    imgpipe.learn.jobs for every job of a run), else ``n_images`` (the run's
    own training images). The result records it as ``schedule_images``, so
    sizing again gives the same schedule. Keys ``train_cfg`` leaves out take the schema's defaults.
    """
    train_cfg = settings.filled("train", train_cfg)
    n = int(train_cfg.get("schedule_images") or n_images or 0)
    if n <= 0:
        raise ValueError("a schedule needs the number of images it is sized on")
    batch = batch_size_for(train_cfg, n)
    return {
        **train_cfg,
        "batch_size": batch,
        "max_epochs": epochs_for(train_cfg, n, batch),
        "schedule_images": n,
    }
