"""Where a training job is and how fast it goes: one callback for the epoch lines and the run's throughput."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from imgpipe.atomic import write_text

log = logging.getLogger("imgpipe")

# Metrics shown on each epoch line, when the run logs them.
EPOCH_METRICS = ("train_loss", "val_loss", "val_acc")


class TrainingProgress(Callback):
    """Counts the images each rank trains on; logs one line per epoch; records the run's throughput.

    Per epoch (rank 0): ``epoch i/n``, the epoch's metrics and images/s. At the
    end, the per-rank counts are gathered and rank 0 writes them with the
    training time to ``stats_path`` (the launcher of forked / spawned ranks
    does not bring callback state back to the calling process). ``threads``
    limits each rank's torch CPU threads (ranks share the job's cores). A tqdm
    bar redrawn in a log file is unreadable and per-step bars cost time on
    small CPU models: one line per epoch tells where the job is.
    """

    def __init__(self, stats_path: Path, threads: int | None = None):
        self.stats_path = Path(stats_path)
        self.threads = threads
        self.run_started = self.epoch_started = 0.0
        self.samples = self.epoch_samples = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Limit this rank's CPU threads."""
        if self.threads:
            torch.set_num_threads(self.threads)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the run's clock."""
        self.samples = 0
        self.run_started = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self.epoch_started = time.perf_counter()
        self.epoch_samples = 0

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
        self.epoch_samples += len(batch[1])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's position, metrics and throughput (rank 0)."""
        if not trainer.is_global_zero:
            return
        seconds = max(time.perf_counter() - self.epoch_started, 1e-9)
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name in EPOCH_METRICS
        }
        shown = " ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
        log.info(
            "epoch %d/%d: %s (%.0f images/s per rank)",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            shown,
            self.epoch_samples / seconds,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather per-rank counts; rank 0 records them with the elapsed time."""
        seconds = time.perf_counter() - self.run_started
        counts = trainer.strategy.all_gather(torch.tensor(self.samples, device=pl_module.device))
        counts = counts.reshape(-1).cpu().tolist()
        if trainer.is_global_zero:
            stats = {
                "train_seconds": seconds,
                "samples_per_rank": counts,
                "world_size": trainer.world_size,
                "stopped_early": trainer.should_stop,
            }
            write_text(json.dumps(stats), self.stats_path)
