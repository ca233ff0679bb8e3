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
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from imgpipe.images.augment import (
    UINT8_WARP_MIN_SIDE,
    affine_maps,
    augment_batch,
    is_geometric,
    policy,
    warp_uint8,
)
from imgpipe.learn.factory import model_from_config
from imgpipe.learn.param_groups import head_parameters, optimizer_groups
from imgpipe.workflow import settings

# One-cycle momentum dips to this share of train.momentum at the learning-rate peak
# (torch's defaults, 0.85 / 0.95, scaled to the configured momentum).
ONECYCLE_MOMENTUM_DIP = 0.85 / 0.95

# Lightning hints that do not apply here: batches are read without decoding
# (workers rarely help on the CPU); metrics are logged per epoch, not per step;
# the module's batch-transfer hooks are meant to win over the data module's;
# srun is only used when SLURM starts the ranks; a frozen backbone keeps its
# norm layers in eval mode on purpose; deprecations inside Lightning itself.
for _hint in (
    "does not have many workers",
    "smaller than the logging interval",
    "overridden `on_after_batch_transfer`",
    "overridden `on_before_batch_transfer`",
    "module(s) in eval mode at the start of training",
    "The `srun` command is available",
    "isinstance(treespec, LeafSpec)` is deprecated",
    "torch.distributed.nn.functional.all_gather is deprecated",
):
    warnings.filterwarnings("ignore", message=f".*{re.escape(_hint)}")


class ImageClassifier(pl.LightningModule):
    """A classifier from ``build_model`` with its loss, optimiser, schedule and batch preprocessing.

    Batches arrive as uint8 NCHW tensors; scaling, the augmentation policy
    (training batches only) and normalisation run on the device after the
    transfer. Everything needed to use the model alone is in its
    hyper-parameters, so a checkpoint describes itself: class names, image
    settings, normalisation, architecture and its arguments.
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
        class_names: Sequence[str] | None = None,
        image_cfg: dict | None = None,
        class_weights: Sequence[float] | None = None,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Calibration (imgpipe.learn.calibration): fitted after training, used only where logits
        # become probabilities for people (never in the loss or the validation metrics).
        self.temperature = float(temperature)
        self.model = model_from_config(
            model_cfg, num_classes, in_channels, image_size, weights=model_cfg.get("weights")
        )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.augment_cfg = dict(augment_cfg or {})
        # The train section as typed settings: the schema's defaults for keys a caller (or a
        # model file of an older release, loaded for prediction) leaves out.
        self.train_settings = settings.TrainSettings.from_config(
            settings.filled("train", train_cfg or {})
        )
        self.channels_last = False
        # Counts summed over every rank, computed once per epoch: exact under DDP on uneven shards.
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def preprocess(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """uint8 NCHW batch -> normalised float batch; with ``augment``, the augmentation policy first.

        On a CPU a uint8 batch is normalised by a table lookup (``by_table``),
        with the policy's warp in the same pass when that is all it does;
        otherwise the policy takes the uint8 batch (from 32 px on a CPU its
        geometry is sampled in uint8: ``imgpipe.images.augment.warp_uint8``) and every
        step after the first float tensor works in place on it: on a CPU each
        extra pass over a 224 px batch costs about as much as the sampling.
        """
        # Without an augment section (none given) there is no policy to apply.
        policy_on = augment and bool(self.augment_cfg) and self.augment_cfg["on_device"]
        out = self.by_table(x, policy_on)
        if out is None:
            if policy_on:
                out = augment_batch(x, self.augment_cfg)
            else:
                out = x.to(torch.float32, copy=True).div_(255.0)
            if out is x:  # a float batch given (and left as it was): not ours to change
                out = out.clone()
            out.sub_(self.mean).div_(self.std)
        x = out
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def normalisation_tables(self) -> torch.Tensor:
        """(C, 256) float32: each channel's normalised value of every grey level.

        Computed with the float path's own operations ((v / 255 - mean) / std,
        in float32), so a lookup gives the same bits.
        """
        levels = torch.arange(256, dtype=torch.float32, device=self.mean.device).div_(255.0)
        return levels.view(1, 256).sub(self.mean.view(-1, 1)).div(self.std.view(-1, 1))

    def by_table(self, x: torch.Tensor, policy_on: bool) -> torch.Tensor | None:
        """A CPU uint8 batch normalised by table lookup, warped first when the policy only moves pixels.

        None where this does not apply: a float or GPU batch, a policy with
        colour jitter (it works on floats), or a policy that moves the pixels
        of images below UINT8_WARP_MIN_SIDE (grid_sample's path keeps their
        results exactly as they were). The draws are the policy's own.
        """
        if x.dtype != torch.uint8 or x.device.type != "cpu" or x.ndim != 4 or len(x) == 0:
            return None
        maps = None
        if policy_on:
            p = policy(self.augment_cfg)
            if p["brightness"] or p["contrast"]:
                return None
            if is_geometric(p):
                if min(x.shape[2:]) < UINT8_WARP_MIN_SIDE:
                    return None
                maps = affine_maps(len(x), p, x.device)
        return warp_uint8(x, maps, tables=self.normalisation_tables())

    def setup(self, stage: str) -> None:
        """On GPUs, make the weights channels-last (faster convolutions) before DDP wraps the model."""
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            self.channels_last = True
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """While training, reseed torch's global RNG from (seed, step, rank) before each batch.

        Dropout and the augmentation draw from the global RNG, which Lightning's
        resume does not restore (and the DataLoader iterator draws from it at
        points that differ between a resumed and an uninterrupted run). Seeding
        each step from its number makes a run resumed after a kill
        bit-identical to an uninterrupted one.
        """
        if self.trainer.training:
            seed = int(self.train_settings.seed)
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
        """Sum of absolute weight values (not biases or norms) of the parts being trained."""
        frozen = getattr(self.model, "backbone_frozen", False)
        params = head_parameters(self.model) if frozen else list(self.model.parameters())
        return sum(p.abs().sum() for p in params if p.ndim > 1)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """Cross entropy (class weights, label smoothing), plus the optional L1 penalty."""
        x, y = batch
        logits = self(x)
        cfg = self.train_settings
        loss = F.cross_entropy(
            logits,
            y,
            weight=self.class_weights,
            label_smoothing=cfg.label_smoothing,
        )
        if cfg.l1 > 0:
            loss = loss + cfg.l1 * self.l1_penalty()
        self.train_loss.update(loss.detach(), weight=len(y))
        self.log("train_loss", self.train_loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """val_loss (plain cross entropy, mean over images) and val_acc, over every rank's images.

        A rank without validation images gets one empty batch (IndexBatches):
        it adds nothing to the sums but still logs, so it joins their sync.
        """
        x, y = batch
        if len(y):
            logits = self(x).float()
            self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
            self.val_acc.update(logits.argmax(dim=1), y)
        self.log("val_loss", self.val_loss, on_step=False, on_epoch=True)
        self.log("val_acc", self.val_acc, on_step=False, on_epoch=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities (N, num_classes)."""
        return torch.softmax(self(batch[0]).float(), dim=1)

    def configure_optimizers(self) -> Any:
        """AdamW or SGD over backbone / head groups, with a per-step cosine or one-cycle schedule.

        ``momentum`` is SGD's momentum or AdamW's beta1. Under the one-cycle
        schedule it cycles around the configured value: from ``momentum`` (low
        learning rate) down to 0.85 x ``momentum`` at the peak and back (momentum
        0 stays 0). The schedule spans the run's ``max_epochs`` (sized by
        imgpipe.learn.schedule), and every run goes through it to the end.
        """
        cfg = self.train_settings
        lr = cfg.lr
        momentum = float(cfg.momentum)
        groups = optimizer_groups(self.model, lr, cfg.weight_decay, cfg.backbone_lr_mult)
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
        schedule = cfg.schedule
        if schedule == "none":
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        if schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[group["lr"] for group in groups],
                total_steps=steps,
                cycle_momentum=momentum > 0,
                base_momentum=ONECYCLE_MOMENTUM_DIP * momentum,
                max_momentum=momentum,
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
