"""Every figure's set-up and saving (matplotlib, Agg backend), and the one image-grid renderer.

Image grids (rejected examples, augmentation preview, suspect labels, cluster
montages, prediction montages) are composed as one numpy canvas and drawn with
a single ``imshow``: a grid of many small matplotlib axes costs seconds, one
canvas milliseconds, and matplotlib still renders any label text (non-ASCII
class names included).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from imgpipe.core.atomic import atomic_path

# Pixels of one grid cell, of the gap between cells, and the figure resolution.
TILE = 64
GAP = 6
DPI = 100


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = DPI) -> None:
    """Save a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


def png_bytes(fig: Any, dpi: int = DPI) -> bytes:
    """A matplotlib figure as PNG bytes (for pages that embed their figures); the figure is closed."""
    import io

    plt = pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def to_rgb_tile(image: np.ndarray, tile: int = TILE) -> np.ndarray:
    """A uint8 HxW, HxWx1 or HxWx3 image as a ``tile`` x ``tile`` RGB cell (aspect kept, padded white)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    height, width = image.shape[:2]
    scale = tile / max(height, width, 1)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Small images are enlarged with hard pixel edges, large ones shrunk smoothly.
    interpolation = cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA
    resized = cv2.resize(
        np.ascontiguousarray(image, dtype=np.uint8), size, interpolation=interpolation
    )
    cell = np.full((tile, tile, 3), 255, np.uint8)
    top, left = (tile - size[1]) // 2, (tile - size[0]) // 2
    cell[top : top + size[1], left : left + size[0]] = resized
    return cell


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | os.PathLike,
    row_titles: Sequence[str] | None = None,
    cell_titles: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    empty_text: str = "none",
    tile: int = TILE,
) -> None:
    """Write a PNG grid: one row of cells per entry of ``rows``, titles beside rows and above cells."""
    plt = pyplot()
    n_rows = max(1, len(rows))
    n_cols = max([1, *(len(row) for row in rows)])
    caption = 0
    if cell_titles is not None:  # 14 px for one caption line, 9 more for each further line
        lines = max([1, *(text.count("\n") + 1 for row in cell_titles for text in row)])
        caption = 14 + 9 * (lines - 1)
    step_x, step_y = tile + GAP, tile + GAP + caption
    canvas = np.full((GAP + n_rows * step_y, GAP + n_cols * step_x, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = GAP + r * step_y + caption, GAP + c * step_x
            canvas[top : top + tile, left : left + tile] = to_rgb_tile(image, tile)
    label_px = 150 if row_titles else 0
    height, width = canvas.shape[:2]
    fig = plt.figure(figsize=((width + label_px) / DPI, (height + (24 if title else 0)) / DPI))
    ax = fig.add_axes((label_px / (width + label_px), 0, width / (width + label_px), 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for r in range(len(rows)):
        if row_titles is not None and r < len(row_titles):
            y = GAP + r * step_y + caption + tile / 2
            ax.text(-8, y, row_titles[r], ha="right", va="center", fontsize=8)
        if cell_titles is not None and r < len(cell_titles):
            for c, text in enumerate(cell_titles[r][: len(rows[r])]):
                x, y = GAP + c * step_x + tile / 2, GAP + r * step_y + caption - 2
                ax.text(x, y, text, ha="center", va="bottom", fontsize=6, clip_on=False)
    if not rows:
        ax.text(width / 2, height / 2, empty_text, ha="center", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- report charts


def class_counts_png(counts: Any) -> bytes:
    """Stacked bars of kept and rejected images per class (a frame indexed by class with those columns)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(min(14.0, max(5.0, 0.4 * len(counts) + 2)), 3.4))
    positions = range(len(counts))
    ax.bar(positions, counts["kept"], color="#4c72b0", label="kept")
    ax.bar(positions, counts["rejected"], bottom=counts["kept"], color="#dd8452", label="rejected")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(
        counts.index,
        rotation=45 if len(counts) > 8 else 0,
        ha="right" if len(counts) > 8 else "center",
    )
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig)


def training_curves_png(histories: Sequence[tuple[str, Any]]) -> bytes:
    """Loss per epoch of every (name, history frame) (training solid, validation dashed) and validation accuracy."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    has_accuracy = [("val_acc" in h and h["val_acc"].notna().any()) for _, h in histories]
    panels = 2 if any(has_accuracy) else 1  # no empty accuracy panel
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for k, (name, history) in enumerate(histories):
        colour = "black" if name == "final model" else colours[k % len(colours)]
        epochs = history["epoch"].astype(int) + 1
        style = {"marker": "o", "ms": 3, "color": colour}
        if "train_loss" in history:
            axes[0][0].plot(epochs, history["train_loss"], label=f"{name}, training", **style)
        if "val_loss" in history and history["val_loss"].notna().any():
            axes[0][0].plot(
                epochs, history["val_loss"], ls="--", label=f"{name}, validation", **style
            )
        if has_accuracy[k]:
            axes[0][1].plot(epochs, history["val_acc"], ls="--", label=name, **style)
    axes[0][0].set_title("loss")
    axes[0][0].set_ylabel("loss")
    if panels == 2:
        axes[0][1].set_title("validation accuracy")
        axes[0][1].set_ylabel("accuracy")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return png_bytes(fig)


def reliability_png(reliability: Mapping[str, Any]) -> bytes:
    """Confidence against accuracy per bin, before and after calibration, with the diagonal."""
    import pandas as pd

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, colour in (("before", "#c44e52"), ("after", "#4c72b0")):
        table = pd.DataFrame(reliability.get(name) or [])
        if table.empty or "count" not in table:
            continue
        table = table[table["count"] > 0]
        ax.plot(table["confidence"], table["accuracy"], color=colour, linewidth=1)
        sizes = 20 + 180 * table["count"] / max(1, table["count"].max())
        ax.scatter(table["confidence"], table["accuracy"], s=sizes, color=colour, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return png_bytes(fig)
