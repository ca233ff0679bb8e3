"""Offline augmentation: materialise seeded torchvision views of the training pool, and preview them."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import v2

from imgpipe.atomic import atomic_path, write_csv
from imgpipe.errors import DataError
from imgpipe.plots import image_grid
from imgpipe.stage import StageJob

log = logging.getLogger("imgpipe")

# Views are made for the whole training pool (imgpipe.split.POOL_ROLES), so that
# k-fold cross-validation can pick each fold's own views.
CHUNK = 1024  # source images per chunk written to the output array


def build_transform(cfg: Mapping) -> v2.Compose:
    """The random transform the ``augment`` config describes; disabled parts are left out."""
    steps: list[torch.nn.Module] = []
    rotation = float(cfg.get("rotation", 0.0))
    translate = float(cfg.get("translate", 0.0))
    scale = tuple(float(s) for s in cfg.get("scale", (1.0, 1.0)))
    if rotation > 0 or translate > 0 or scale != (1.0, 1.0):
        steps.append(
            v2.RandomAffine(
                degrees=rotation,
                translate=(translate, translate) if translate > 0 else None,
                scale=scale if scale != (1.0, 1.0) else None,
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    if cfg.get("hflip"):
        steps.append(v2.RandomHorizontalFlip())
    if cfg.get("vflip"):
        steps.append(v2.RandomVerticalFlip())
    brightness = float(cfg.get("brightness", 0.0))
    contrast = float(cfg.get("contrast", 0.0))
    if brightness > 0 or contrast > 0:
        steps.append(v2.ColorJitter(brightness=brightness or None, contrast=contrast or None))
    return v2.Compose(steps or [v2.Identity()])  # Compose refuses an empty list


def iter_views(
    images: Any, cfg: Mapping, copies: int, seed: int, chunk: int = CHUNK
) -> Iterator[np.ndarray]:
    """Yield the views of ``chunk`` images at a time: uint8 NHWC, ``copies`` rows per image.

    A v2 transform draws one set of random parameters per call and applies it
    to a whole batch, so each view is its own call (on a CHW tensor of the
    batch converted once). The torch RNG is forked, so seeding does not leak
    into the caller.
    """
    transform = build_transform(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(images), chunk):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk]))
            batch = batch.permute(0, 3, 1, 2)  # NHWC -> NCHW
            views = torch.stack([transform(image) for image in batch for _ in range(copies)])
            yield views.permute(0, 2, 3, 1).contiguous().numpy()


def augment_images(
    images: np.ndarray, cfg: Mapping, copies: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (views uint8 (N*copies, H, W, C), position of each view's source image)."""
    check_images(images)
    sources = np.repeat(np.arange(len(images)), copies)
    if copies == 0 or len(images) == 0:
        return np.zeros((0, *images.shape[1:]), dtype=np.uint8), sources
    return np.concatenate(list(iter_views(images, cfg, copies, seed))), sources


def check_images(images: Any) -> None:
    """Refuse anything but a uint8 NHWC array with 1 or 3 channels."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"expected uint8 (N, H, W, 1|3) images, got {images.dtype} {images.shape}")


def write_augmented(
    images: Any,
    source_ids: np.ndarray,
    cfg: Mapping,
    images_path: str | os.PathLike,
    index_path: str | os.PathLike,
) -> int:
    """Stream the views of ``images`` into ``images_path`` (.npy) and write ``aug_row, source_id``.

    Returns the number of views. The array is filled chunk by chunk through a
    memory map, so the pool's views never have to fit in memory at once.
    """
    check_images(images)
    copies, seed = int(cfg["copies"]), int(cfg["seed"])
    total = len(images) * copies
    with atomic_path(images_path) as tmp:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(total, *images.shape[1:])
        )
        row = 0
        if total:
            for views in iter_views(images, cfg, copies, seed):
                out[row : row + len(views)] = views
                row += len(views)
        out.flush()
        del out
    index = pd.DataFrame(
        {"aug_row": np.arange(total), "source_id": np.repeat(np.asarray(source_ids), copies)}
    )
    write_csv(index, index_path)
    return total


def plot_preview(
    images: Any,
    views: np.ndarray,
    view_sources: np.ndarray,
    path: str | os.PathLike,
    examples: int = 12,
    max_views: int = 6,
) -> None:
    """Save a grid of examples: each row an original image followed by its views."""
    sources = np.unique(view_sources)
    # Evenly spaced examples: the pool is in index (class folder) order, so they span the classes.
    picks = np.linspace(0, len(sources) - 1, min(examples, len(sources))).round().astype(int)
    shown = sources[np.unique(picks)] if len(sources) else sources
    rows = []
    for source in shown:
        members = np.flatnonzero(view_sources == source)[:max_views]
        rows.append([images[[source]][0], *(views[row] for row in members)])
    width = max((len(row) for row in rows), default=0)
    titles = [["original", *(f"view {c}" for c in range(1, width))]] + [[""] * width] * (
        len(rows) - 1
    )
    image_grid(rows, path, cell_titles=titles if rows else None, empty_text="no augmented views")


def run_augment(job: StageJob) -> int:
    """The augment stage: views of the training pool (images.npy, index.csv) and their preview."""
    from imgpipe.dataset import load_index, open_images
    from imgpipe.split import load_split, training_pool

    pool = training_pool(load_index(job.input["index"]), load_split(job.input["split"]))
    if pool.empty:
        raise DataError("the split has no train or val image to augment")
    images = open_images(pool)
    log.info("augmenting %d training-pool images of shape %s", len(pool), images.shape[1:])
    return augment_pool(images, pool["id"].to_numpy(), job.params["augment"], job.output)


def augment_pool(
    images: Any, ids: np.ndarray, cfg: Mapping, outputs: Mapping[str, str | os.PathLike]
) -> int:
    """Write the views of the pool ``images`` (ids ``ids``): images.npy, index.csv and preview.png."""
    total = write_augmented(images, ids, cfg, outputs["images"], outputs["index"])
    log.info("wrote %d views (%d per image) of %d images", total, cfg["copies"], len(images))
    # The preview shows the written rows themselves: row r is a view of image r // copies.
    views = np.load(outputs["images"], mmap_mode="r", allow_pickle=False)
    sources = np.arange(len(views)) // max(int(cfg["copies"]), 1)
    plot_preview(images, views, sources, outputs["preview"])
    return total
