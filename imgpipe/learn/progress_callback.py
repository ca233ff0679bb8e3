"""Where a training job is and how fast it goes: one callback for the epoch lines and the run's throughput.

The data stages' progress lines come from ``imgpipe.core.logs.Progress`` (no
Lightning needed there); both go to the job's log and, while progress is on,
to the terminal (``imgpipe.core.logs.progress_line``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from imgpipe.core.atomic import write_text
from imgpipe.core.logs import duration, progress_line

log = logging.getLogger("imgpipe")

# Metrics shown on each epoch line, when the run logs them.
EPOCH_METRICS = ("train_loss", "val_loss", "val_acc")


class TrainingProgress(Callback):
    """Counts the images each rank trains on; logs one line per epoch; records the run's throughput.

    Per epoch (rank 0): ``epoch i/n``, the epoch's metrics, images/s and the
    time left at the pace of this attempt's epochs so far (early stopping may
    end sooner), to the log and the terminal. At the
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
        self.epochs_timed = 0
        self.epoch_seconds = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Limit this rank's CPU threads."""
        if self.threads:
            torch.set_num_threads(self.threads)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the run's clock."""
        self.samples = 0
        self.epochs_timed, self.epoch_seconds = 0, 0.0
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
        """Log the epoch's position, metrics, throughput and the time left (rank 0)."""
        seconds = max(time.perf_counter() - self.epoch_started, 1e-9)
        self.epochs_timed += 1
        self.epoch_seconds += seconds
        if not trainer.is_global_zero:
            return
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name in EPOCH_METRICS
        }
        shown = ", ".join(
            f"{name} {metrics[name]:.4f}" for name in EPOCH_METRICS if name in metrics
        )
        epochs_left = max(int(trainer.max_epochs or 0) - trainer.current_epoch - 1, 0)
        left = epochs_left * self.epoch_seconds / self.epochs_timed
        per_rank = " per rank" if trainer.world_size > 1 else ""
        progress_line(
            "epoch %d/%d: %s; %.0f images/s%s; %s left",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            shown or "no metric logged",
            self.epoch_samples / seconds,
            per_rank,
            duration(left),
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
