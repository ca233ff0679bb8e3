"""The LightningDataModule: one run's training and validation images, read batch by batch from disk.

Images stay in the ingest shards (``imgpipe.data.dataset.ShardImages``) and in the
optional materialised views of the augment stage; a batch is read when the
loader reaches it, as uint8, and becomes float on the training device (see
``ImageClassifier.preprocess``). Memory therefore follows the batch size, not
the number of images.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from imgpipe.data.dataset import NpyRows, ShardImages
from imgpipe.infer.network import to_uint8_nchw  # noqa: F401 - the loaders' conversion, also imported from here

# Anything indexable by an array of positions returning uint8 NHWC: a numpy
# array, imgpipe.data.dataset.ShardImages or imgpipe.data.dataset.NpyRows.
Images = Any


# glibc hands every freed block above its mmap threshold (32 MB at most) back to the
# kernel, so on a CPU each step's float batch (128 x 3 x 224 x 224 floats: 77 MB) and
# the model's activations are faulted in afresh, page by page: that costs more than
# reading and augmenting the batch. Raising the threshold and the trim limit keeps
# freed blocks for the next step's (what jemalloc and tcmalloc, which PyTorch's CPU
# tuning guide recommends, do by default). Peak memory stays what it was.
KEEP_FREED_BYTES = 1 << 30
_kept_freed_memory: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc reuse freed large blocks instead of unmapping them (once per process; False elsewhere)."""
    global _kept_freed_memory
    if _kept_freed_memory is None:
        _kept_freed_memory = False
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            _kept_freed_memory = bool(
                libc.mallopt(m_mmap_threshold, KEEP_FREED_BYTES)
                and libc.mallopt(m_trim_threshold, 2 * KEEP_FREED_BYTES)
            )
        except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
            pass
    return _kept_freed_memory


def training_augment_rows(aug_source_ids: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """Indices of the augmented rows whose source image is one of this run's training ids."""
    return np.flatnonzero(np.isin(np.asarray(aug_source_ids), np.asarray(train_ids)))


class ImageBatches(Dataset):
    """Item ``k`` is image ``ids[k]`` of ``images``, then (k >= len(ids)) the augmented views ``aug_rows``.

    Indexed with a whole batch of positions at once (see IndexBatches): one
    read per batch, returning (uint8 NCHW tensor, int64 labels).
    """

    def __init__(
        self,
        images: Images,
        ids: np.ndarray,
        labels: np.ndarray,
        aug_images: Images | None = None,
        aug_rows: np.ndarray | None = None,
        aug_labels: np.ndarray | None = None,
    ):
        self.images, self.ids = images, np.asarray(ids, dtype=np.int64)
        self.aug_images = aug_images
        self.aug_rows = np.zeros(0, np.int64) if aug_rows is None else np.asarray(aug_rows)
        aug_labels = np.zeros(0, np.int64) if aug_labels is None else np.asarray(aug_labels)
        self.labels = torch.from_numpy(np.concatenate([labels, aug_labels]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        n = len(self.ids)
        own = positions < n
        batch = np.empty((len(positions), *self.images.shape[1:]), dtype=np.uint8)
        fill(batch, np.flatnonzero(own), self.images, self.ids[positions[own]])
        if not own.all():
            where = np.flatnonzero(~own)
            fill(batch, where, self.aug_images, self.aug_rows[positions[where] - n])
        return to_uint8_nchw(batch), self.labels[positions]


def fill(batch: np.ndarray, slots: np.ndarray, images: Images, rows: np.ndarray) -> None:
    """``batch[slots[k]] = images[rows[k]]``, read straight into ``batch`` where the reader can."""
    if len(slots) == 0:
        return
    if isinstance(images, ShardImages | NpyRows):
        images.read_into(rows, batch, slots=slots)
    else:
        batch[slots] = images[rows]


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-item sampling weight 1 / (items of its class): every class is drawn equally often."""
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


class IndexBatches(Sampler):
    """Yields index batches for one rank: a seeded per-epoch shuffle, strided over the ranks.

    Training batches pad the permutation so every rank runs the same number of
    steps (DDP needs it); evaluation batches do not pad, so metrics count each
    image once. With ``weights`` (training only) each epoch draws ``n`` items
    with replacement, item k with probability proportional to ``weights[k]``
    (a class-balanced sampler), seeded per epoch like the shuffle.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        weights: torch.Tensor | None = None,
    ):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (Lightning calls this at each epoch start)."""
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        if self.shuffle and self.weights is not None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        elif self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        if self.shuffle and self.world_size > 1:
            total = math.ceil(self.n / self.world_size) * self.world_size
            order = torch.cat([order, order[: total - self.n]])
        return order[self.rank :: self.world_size]

    def idle_rank(self) -> bool:
        """An evaluation rank left without images (fewer images than ranks): it yields one empty batch.

        Lightning refuses a rank whose loader has no batch, and every rank must
        join the epoch's metric sync; the empty batch adds nothing to the sums.
        """
        return not self.shuffle and 0 < self.n <= self.rank

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.idle_rank():
            yield torch.zeros(0, dtype=torch.int64)
            return
        indices = self._indices()
        stop = len(indices) - len(indices) % self.batch_size if self.drop_last else len(indices)
        for start in range(0, stop, self.batch_size):
            yield indices[start : start + self.batch_size]

    def __len__(self) -> int:
        if self.idle_rank():
            return 1
        per_rank = (
            math.ceil(self.n / self.world_size)
            if self.shuffle
            else len(range(self.rank, self.n, self.world_size))
        )
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)


class ImageDataModule(pl.LightningDataModule):
    """One run's images: its training ids (+ their augmented views) and its validation ids.

    ``train_ids`` / ``val_ids`` are positions in ``images`` (the clean index's
    ``id``). Augmented views are picked with ``training_augment_rows`` so a run
    only sees views of its own training images. ``batch_size`` is the global
    batch: under DDP each of the ``world_size`` processes takes
    ceil(batch_size / world_size) images per step, so a multi-process run
    follows the recipe (batch, learning rate, steps per epoch) of the
    single-device runs that validated it. ``balanced`` samples every class
    equally often (with replacement) instead of shuffling. ``pin_memory``: page-locked
    batches (default: when the trainer runs on cuda).
    """

    def __init__(
        self,
        images: Images,
        labels: np.ndarray,
        train_ids: Sequence[int],
        val_ids: Sequence[int],
        aug_images: Images | None = None,
        aug_sources: np.ndarray | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        balanced: bool = False,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        train_ids = np.asarray(train_ids, dtype=np.int64)
        val_ids = np.asarray(val_ids, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        rows, aug_labels = None, None
        self.aug_count = 0
        if aug_images is not None and len(aug_images):
            aug_sources = np.asarray(aug_sources, dtype=np.int64)
            rows = training_augment_rows(aug_sources, train_ids).astype(np.int64)
            aug_labels = labels[aug_sources[rows]]
            self.aug_count = len(rows)
        self.train_set = ImageBatches(
            images, train_ids, labels[train_ids], aug_images, rows, aug_labels
        )
        self.val_set = ImageBatches(images, val_ids, labels[val_ids])
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.balanced = balanced
        self.pin_memory = pin_memory

    def rank_batch_size(self, world: int) -> int:
        """Images per step on each of ``world`` processes (the global batch split evenly)."""
        return max(1, math.ceil(self.batch_size / world))

    def _loader(self, dataset: ImageBatches, train: bool) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        batch = self.rank_batch_size(world)
        # Drop a ragged last batch in training: a batch of one breaks batch norm.
        drop_last = train and len(dataset) >= batch * world
        batches = IndexBatches(
            len(dataset),
            batch,
            shuffle=train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            drop_last=drop_last,
            weights=balanced_weights(dataset.labels) if train and self.balanced else None,
        )
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        if not on_gpu:
            keep_freed_memory()
        return DataLoader(
            dataset,
            sampler=batches,
            batch_size=None,
            num_workers=self.num_workers,
            # Page-locked batches: the copy to the GPU is an asynchronous DMA
            # (Lightning moves them with non_blocking=True).
            pin_memory=on_gpu if self.pin_memory is None else self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled index batches of the training images and their augmented views."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation images in order (each counted once across ranks)."""
        return self._loader(self.val_set, train=False)
