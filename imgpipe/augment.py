"""Offline augmentation: materialise seeded torchvision views of the training pool."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import v2

from imgpipe.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger("imgpipe")

# Roles whose images get augmented views: the whole training pool, so that
# k-fold cross-validation can filter the views per fold.
POOL_ROLES = ("train", "val")
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
    images: np.ndarray, cfg: Mapping, copies: int, seed: int, chunk: int = CHUNK
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


def check_images(images: np.ndarray) -> None:
    """Refuse anything but a uint8 NHWC array with 1 or 3 channels."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"expected uint8 (N, H, W, 1|3) images, got {images.dtype} {images.shape}")


def pool_ids(roles: pd.DataFrame) -> np.ndarray:
    """Sorted ids of the images whose views are materialised (roles train and val)."""
    return np.sort(roles.loc[roles["role"].isin(POOL_ROLES), "id"].to_numpy())


def training_augment_rows(aug_source_ids: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """Indices of the augmented rows whose source image is one of this run's training ids."""
    return np.flatnonzero(np.isin(np.asarray(aug_source_ids), np.asarray(train_ids)))


def leaked_sources(
    aug_source_ids: np.ndarray, rows: np.ndarray, train_ids: np.ndarray
) -> np.ndarray:
    """Source ids of selected augmented rows that are not training ids (empty when no leak)."""
    selected = np.asarray(aug_source_ids)[np.asarray(rows, dtype=np.int64)]
    return np.unique(selected[~np.isin(selected, np.asarray(train_ids))])


def write_augmented(
    images: np.ndarray,
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
    with atomic_path(index_path) as tmp:
        index.to_csv(tmp, index=False)
    return total


def plot_preview(
    images: np.ndarray,
    views: np.ndarray,
    view_sources: np.ndarray,
    path: str | os.PathLike,
    examples: int = 12,
    max_views: int = 6,
) -> None:
    """Save a grid of examples, each an original followed by its views (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = np.unique(view_sources)
    # Evenly spaced examples: the pool is in index (class folder) order, so they span the classes.
    shown = sources[
        np.unique(np.linspace(0, len(sources) - 1, min(examples, len(sources))).round().astype(int))
    ]
    per_example = [np.flatnonzero(view_sources == s)[:max_views] for s in shown]
    block = 1 + max((len(rows) for rows in per_example), default=0)
    # Several examples side by side when each has few views, so the grid stays compact.
    across = max(1, min(4, 12 // block))
    n_rows = max(1, -(-len(shown) // across))
    fig, axes = plt.subplots(
        n_rows, block * across, figsize=(1.1 * block * across, 1.2 * n_rows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    if not len(shown):
        axes[0, 0].text(0.5, 0.5, "no augmented views", ha="center", va="center")
    for n, (source, rows) in enumerate(zip(shown, per_example, strict=True)):
        r, c0 = divmod(n, across)
        c0 *= block
        show_image(axes[r, c0], images[source], "original" if r == 0 else None)
        for c, row in enumerate(rows, start=1):
            show_image(axes[r, c0 + c], views[row], f"view {c}" if r == 0 else None)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def show_image(ax: Axes, image: np.ndarray, title: str | None) -> None:
    """Draw one uint8 HWC image (grey or RGB) on a matplotlib axis."""
    if image.shape[2] == 1:
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=8)


def stage_augment(
    images: np.ndarray, ids: np.ndarray, cfg: Mapping, out: Mapping[str, str | os.PathLike]
) -> int:
    """Write images.npy, index.csv and preview.png for the pool ``images`` (ids in ``ids``)."""
    total = write_augmented(images, ids, cfg, out["images"], out["index"])
    log.info("wrote %d views (%d per image) of %d images", total, cfg["copies"], len(images))
    # The preview shows the written rows themselves: row r is a view of image r // copies.
    views = np.load(out["images"], mmap_mode="r", allow_pickle=False)
    copies = max(int(cfg["copies"]), 1)
    sources = np.arange(len(views)) // copies
    plot_preview(images, views, sources, out["preview"])
    return total
