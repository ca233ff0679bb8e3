"""Shared figure helpers (matplotlib, Agg backend): image grids for the report."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from imgpipe.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: object, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a matplotlib figure atomically (temp file + rename) and close it."""
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | os.PathLike,
    row_titles: Sequence[str] | None = None,
    cell_titles: Sequence[Sequence[str]] | None = None,
    cell_inches: float = 0.9,
) -> None:
    """Write a PNG grid: one row per entry of ``rows`` (uint8 HxW, HxWx1 or HxWx3 images)."""
    plt = _pyplot()
    n_rows = max(1, len(rows))
    n_cols = max([1, *(len(row) for row in rows)])
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(cell_inches * n_cols + (1.6 if row_titles else 0), cell_inches * n_rows + 0.3),
        squeeze=False,
    )
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r < len(rows) and c < len(rows[r]):
                image = np.asarray(rows[r][c])
                if image.ndim == 3 and image.shape[2] == 1:
                    image = image[:, :, 0]
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
                if cell_titles is not None:
                    ax.set_title(cell_titles[r][c], fontsize=6)
        if row_titles is not None and r < len(row_titles):
            axes[r][0].set_ylabel(row_titles[r], rotation=0, ha="right", va="center", fontsize=8)
    if not rows:
        axes[0][0].text(0.5, 0.5, "none", ha="center", va="center")
    save_figure(fig, path)
