"""Ingest one shard of files.csv: decode, measure, resize into a memory-mapped array.

The per-file path is kept lean (one read, one decode, numpy/OpenCV only, rows
collected in plain lists): on small images the fixed per-file cost dominates.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping

import cv2
import numpy as np
import pandas as pd

from imgpipe.imageio import MODES, decode_image, fit_square
from imgpipe.imagestats import gray_stats, phash
from imgpipe.scan import write_csv_atomic

log = logging.getLogger("imgpipe")

PASSED_COLUMNS = ["path", "relpath", "label", "source"]
STATS_COLUMNS = [
    *PASSED_COLUMNS,
    "row",
    "bytes",
    "sha256",
    "width",
    "height",
    "channels",
    "bit_depth",
    "status",
    "reason",
    "detail",
    "pixel_hash",
    "phash",
    "mean",
    "std",
    "p01",
    "p99",
    "blur",
]
INT_COLUMNS = ["row", "bytes", "width", "height", "channels", "bit_depth"]
MEASURES = ["mean", "std", "p01", "p99", "blur"]
# Hashes are text: read back with dtype=str (load_stats) so that an all-digit
# hex string is never parsed as a number. phash is "0x" + 16 hex digits.
TEXT_COLUMNS = [
    "path",
    "relpath",
    "label",
    "source",
    "sha256",
    "status",
    "reason",
    "detail",
    "pixel_hash",
    "phash",
]


def shard_positions(n_rows: int, shard: int, shards: int) -> np.ndarray:
    """Rows ``j`` of files.csv that belong to ``shard``: those with ``j % shards == shard``."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} outside 0..{shards - 1}")
    return np.arange(shard, n_rows, shards)


def pixel_hash(image: np.ndarray) -> str:
    """Hash of an image's shape and decoded pixels: equal for files with the same pixels."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(image.shape, np.int64).tobytes())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def format_phash(value: int) -> str:
    """A 64-bit perceptual hash as text that CSV readers keep exact (``0x`` + 16 hex digits)."""
    return f"{value:#018x}"


def phash_values(hashes: pd.Series) -> np.ndarray:
    """The uint64 perceptual hashes of a stats.csv ``phash`` column (for imagestats.hamming)."""
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def stats_table(records: list[tuple]) -> pd.DataFrame:
    """The stats.csv table from per-file tuples in STATS_COLUMNS order (None = empty)."""
    table = pd.DataFrame.from_records(records, columns=STATS_COLUMNS)
    for name in INT_COLUMNS:
        table[name] = table[name].astype("Int64")
    for name in MEASURES:
        table[name] = table[name].astype("float64")
    return table


# Fields ingest_file measures, in STATS_COLUMNS order after the passed-through ones.
MEASURED_COLUMNS = STATS_COLUMNS[len(PASSED_COLUMNS) + 1 :]


def ingest_file(
    path: str, mode: str, size: int, fit: str, max_pixels: int
) -> tuple[tuple, np.ndarray | None]:
    """Measure one file: its MEASURED_COLUMNS values and its resized image (None if refused)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        detail = f"{type(err).__name__}: {err.strerror or err}"
        return _refused_fields(None, None, None, "unreadable", detail), None
    decoded = decode_image(data, mode, max_pixels)
    digest = hashlib.sha256(data).hexdigest()
    size_info = (
        decoded.width or None,
        decoded.height or None,
        decoded.channels or None,
        decoded.bit_depth or None,
    )
    if decoded.image is None:
        return _refused_fields(len(data), digest, size_info, decoded.reason, decoded.detail), None
    image = decoded.image
    gray = image[:, :, 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    stats = gray_stats(gray)  # measured at the full decoded resolution
    fields = (
        len(data),
        digest,
        *size_info,
        "ok",
        "",
        decoded.detail,
        pixel_hash(image),
        format_phash(phash(gray)),
        stats["mean"],
        stats["std"],
        stats["p01"],
        stats["p99"],
        stats["blur"],
    )
    return fields, fit_square(image, size, fit)


def _refused_fields(
    n_bytes: int | None, digest: str | None, size_info: tuple | None, reason: str, detail: str
) -> tuple:
    size_info = size_info or (None, None, None, None)
    return (n_bytes, digest, *size_info, "rejected", reason, detail, *[None] * 7)


def _temp_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def _open_array(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """A zero-filled uint8 .npy file of ``shape`` opened for writing (memory-mapped)."""
    if 0 in shape:  # numpy cannot memory-map an empty array
        empty = np.zeros(shape, np.uint8)
        with open(path, "wb") as fh:
            np.save(fh, empty)
        return empty
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)


class _Progress:
    """Logs files done and files/s about every 5% and at the end."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.every = max(1, total // 20)
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        if done % self.every and done != self.total:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        log.info("%s: %d/%d files (%.0f files/s)", self.label, done, self.total, done / elapsed)


def index_shard(
    files_df: pd.DataFrame,
    shard: int,
    shards: int,
    image_cfg: Mapping,
    max_pixels: int,
    stats_path: str | os.PathLike,
    images_path: str | os.PathLike,
) -> pd.DataFrame:
    """Ingest rows ``j % shards == shard`` of files.csv into stats.csv and images.npy; return the stats.

    Rows the listing rejected pass through unopened (zeros in the array).
    Both outputs are written under temporary names and renamed at the end.
    """
    size, mode, fit = int(image_cfg["size"]), image_cfg["mode"], image_cfg.get("fit", "pad")
    if mode not in MODES:
        raise ValueError(f"image.mode {mode!r}: expected one of {sorted(MODES)}")
    part = files_df.iloc[shard_positions(len(files_df), shard, shards)]
    n = len(part)
    stats_path, images_path = os.fspath(stats_path), os.fspath(images_path)
    os.makedirs(os.path.dirname(os.path.abspath(images_path)), exist_ok=True)
    tmp_images = _temp_name(images_path)
    images = _open_array(tmp_images, (n, size, size, MODES[mode]))
    records: list[tuple] = []
    # Plain ndarray view: the memmap subclass adds overhead to every assignment.
    array = images.view(np.ndarray)
    progress = _Progress(n, f"shard {shard}")
    listed = zip(
        *(part[c].tolist() for c in [*PASSED_COLUMNS, "status", "reason", "detail"]), strict=True
    )
    try:
        for row, (path, relpath, label, source, status, reason, detail) in enumerate(listed):
            if status != "ok":  # refused by the listing: not opened
                fields = _refused_fields(None, None, None, reason, detail)
            else:
                fields, resized = ingest_file(path, mode, size, fit, max_pixels)
                if resized is not None:
                    array[row] = resized
            records.append((path, relpath, label, source, row, *fields))
            progress.update(row + 1)
        if isinstance(images, np.memmap):
            images.flush()
        del images, array
        stats = stats_table(records)
        write_csv_atomic(stats, stats_path)
        os.replace(tmp_images, images_path)
    finally:
        if os.path.exists(tmp_images):
            os.remove(tmp_images)
    return stats


def load_stats(path: str | os.PathLike) -> pd.DataFrame:
    """Read a shard's stats.csv with hashes and text kept as strings and counts as integers."""
    dtypes = {c: str for c in TEXT_COLUMNS} | {c: "Int64" for c in INT_COLUMNS}
    return pd.read_csv(
        path,
        dtype=dtypes,
        keep_default_na=False,
        na_values={c: [""] for c in [*INT_COLUMNS, *MEASURES]},
    )
