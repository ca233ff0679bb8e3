"""Read the clean stage's index and gather its images from the memory-mapped shard arrays."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

INDEX_COLUMNS = [
    "id",
    "path",
    "relpath",
    "label",
    "source",
    "sha256",
    "group",
    "shard",
    "row",
    "array",
    "near_group",
]
_TEXT_COLUMNS = ["path", "relpath", "label", "source", "sha256", "array"]


def load_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read index.csv with labels and paths as text and ids, groups and rows as integers."""
    index = pd.read_csv(
        path,
        dtype={name: str for name in _TEXT_COLUMNS},
        keep_default_na=False,
    )
    missing = [name for name in INDEX_COLUMNS if name not in index.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    for name in ("id", "group", "shard", "row"):
        index[name] = index[name].astype(np.int64)
    return index


def load_images(index: pd.DataFrame) -> np.ndarray:
    """Gather the index's rows from the shard arrays into one contiguous uint8 NHWC array.

    Each shard array is opened once, memory-mapped, and read in ascending row
    order (sequential disk access); the result is in the index's row order.
    """
    if len(index) == 0:
        raise ValueError("cannot load images of an empty index")
    rows = index["row"].to_numpy(dtype=np.int64)
    out: np.ndarray | None = None
    for array_path, positions in index.groupby("array", sort=True).indices.items():
        # Shard arrays are plain uint8: never unpickle, never cast another dtype silently.
        shard = np.load(array_path, mmap_mode="r", allow_pickle=False)
        if shard.dtype != np.uint8 or shard.ndim != 4:
            raise ValueError(
                f"{array_path}: expected uint8 (N, H, W, C), got {shard.dtype} {shard.shape}"
            )
        if out is None:
            out = np.empty((len(index), *shard.shape[1:]), dtype=np.uint8)
        elif shard.shape[1:] != out.shape[1:]:
            raise ValueError(f"{array_path}: image shape {shard.shape[1:]} != {out.shape[1:]}")
        order = np.argsort(rows[positions], kind="stable")
        out[positions[order]] = shard[rows[positions][order]]
    return out


def class_names(index: pd.DataFrame) -> list[str]:
    """The sorted list of distinct labels."""
    return sorted(index["label"].astype(str).unique().tolist())


def label_codes(index: pd.DataFrame) -> np.ndarray:
    """Integer label per row: its position in ``class_names(index)``."""
    names = np.asarray(class_names(index))
    return np.searchsorted(names, index["label"].astype(str).to_numpy()).astype(np.int64)
