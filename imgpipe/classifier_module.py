"""The LightningModule: the classifier, its loss, optimiser and schedule, and on-device batch preprocessing."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from imgpipe.models import build_model

# Lightning hints that do not apply here: the arrays are decoded in memory (a
# batch is one tensor gather, workers cannot help); metrics are logged per
# epoch, not per step; the module's on_after_batch_transfer is meant to win
# over the data module's; srun is only used when SLURM starts the ranks;
# deprecations inside Lightning itself.
for _hint in (
    "does not have many workers",
    "smaller than the logging interval",
    "overridden `on_after_batch_transfer`",
    "The `srun` command is available",
    "isinstance(treespec, LeafSpec)` is deprecated",
    "torch.distributed.nn.functional.all_gather is deprecated",
):
    warnings.filterwarnings("ignore", message=f".*{re.escape(_hint)}")


def to_uint8_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 array -> contiguous (N, C, H, W) uint8 tensor."""
    array = np.asarray(images)
    if array.ndim != 4 or array.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (independently per image)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_translate(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop of the zero-padded image, i.e. a random shift of up to ``padding`` px per image."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class ImageClassifier(pl.LightningModule):
    """A classifier from ``build_model`` with its loss, optimiser, schedule and batch preprocessing.

    Batches arrive as uint8 NCHW tensors; scaling, normalisation and the
    online augmentation run on the device after the transfer.
    """

    def __init__(
        self,
        model_cfg: dict,
        train_cfg: dict,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment_cfg: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(
            model_cfg["name"],
            num_classes,
            in_channels,
            image_size,
            channels=model_cfg.get("channels", (32, 64, 128)),
            dropout=model_cfg.get("dropout", 0.3),
            pretrained=model_cfg.get("pretrained", False),
        )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        online = train_cfg.get("online_augment", {})
        self.augment_enabled = bool(online.get("enabled", True))
        self.augment_hflip = bool((augment_cfg or {}).get("hflip", False))
        self.augment_padding = int(online.get("crop_padding", 2))

    def preprocess(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """uint8 NCHW batch -> normalised float batch, optionally randomly flipped / shifted."""
        x = x.float().div_(255.0)
        if augment and self.augment_enabled:
            if self.augment_hflip:
                x = random_hflip(x)
            x = random_translate(x, self.augment_padding)
        x = (x - self.mean) / self.std
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def on_fit_start(self) -> None:
        """On GPUs, keep the weights channels-last like the batches (faster convolutions)."""
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """While training, reseed torch's global RNG from (seed, step, rank) before each batch.

        Dropout and the online augmentation draw from the global RNG, which
        Lightning's resume does not restore (and the DataLoader iterator draws
        from it at points that differ between a resumed and an uninterrupted
        run). Seeding each step from its number makes a run resumed after a
        kill bit-identical to an uninterrupted one.
        """
        if self.trainer.training:
            seed = int(self.hparams.train_cfg.get("seed", 0))
            entropy = [seed, self.trainer.global_step, self.global_rank]
            torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Preprocess on the device; augment only while training."""
        images, *rest = batch
        return (self.preprocess(images, augment=self.trainer.training), *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a preprocessed batch."""
        return self.model(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of a preprocessed batch."""
        return self.model.embed(x)

    def l1_penalty(self) -> torch.Tensor:
        """Sum of absolute values of the weight matrices / kernels (not biases or norms)."""
        return sum(p.abs().sum() for p in self.model.parameters() if p.ndim > 1)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """Cross entropy with label smoothing, plus the optional L1 penalty."""
        x, y = batch
        logits = self(x)
        cfg = self.hparams.train_cfg
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.get("label_smoothing", 0.0))
        if cfg.get("l1", 0.0) > 0:
            loss = loss + cfg["l1"] * self.l1_penalty()
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True
        )
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        # Weighted by batch size and summed over ranks: exact on uneven shards.
        self.log(f"{prefix}_loss", loss, batch_size=len(y), sync_dist=True)
        self.log(f"{prefix}_acc", acc, batch_size=len(y), sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log val_loss (plain cross entropy) and val_acc."""
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log test_loss and test_acc."""
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities (N, num_classes)."""
        return torch.softmax(self(batch[0]).float(), dim=1)

    def configure_optimizers(self) -> Any:
        """AdamW or SGD (weight decay on weights only) with a per-step cosine / one-cycle schedule."""
        cfg = self.hparams.train_cfg
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        groups = [
            {"params": decay, "weight_decay": cfg.get("weight_decay", 0.0)},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        lr = cfg["lr"]
        if cfg.get("optimizer", "adamw") == "sgd":
            optimizer = torch.optim.SGD(
                groups, lr=lr, momentum=cfg.get("momentum", 0.9), nesterov=True
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr)
        schedule = cfg.get("schedule", "none")
        if schedule == "none":
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        if schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
