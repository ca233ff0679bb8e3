"""One log line per epoch: where a long training job is, readable in its log file."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

log = logging.getLogger("imgpipe")


class EpochProgress(Callback):
    """Log ``epoch i/n``, the epoch's metrics and images/s after every epoch (rank 0 only).

    A tqdm bar redrawn in a log file is unreadable, and per-step bars cost
    time on small CPU models; one line per epoch tells where the job is.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.samples = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self.started = time.perf_counter()
        self.samples = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Count this rank's images."""
        self.samples += len(batch[1])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's position, metrics and throughput."""
        if not trainer.is_global_zero:
            return
        seconds = max(time.perf_counter() - self.started, 1e-9)
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name in ("train_loss", "val_loss", "val_acc")
        }
        shown = " ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
        log.info(
            "epoch %d/%d: %s (%.0f images/s per rank)",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            shown,
            self.samples / seconds,
        )
