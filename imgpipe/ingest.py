"""Ingest one shard of files.csv: decode, measure, resize into a memory-mapped array.

Files stream through in small bounded batches (see BATCH_FILES). The per-file
path is kept lean (one read, one decode, OpenCV rather than PIL, rows kept as
tuples and turned into one DataFrame at the end): on small images the fixed
per-file cost dominates.

stats.csv keeps hashes as text: ``sha256`` and ``pixel_hash`` in hex, ``phash``
as ``0x`` + 16 hex digits (a 64-bit integer would not survive a CSV reader that
turns a column with empty cells into floats). ``load_stats`` reads it back and
``phash_values`` gives the uint64 hashes.
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

from imgpipe.atomic import atomic_path, write_csv
from imgpipe.imageio import MODES, decode_image, fit_square, read_bytes
from imgpipe.imagestats import format_thumbnail, gray_stats, phash, thumbnail
from imgpipe.stage import StageJob

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
    "thumb",
]
INT_COLUMNS = ["row", "bytes", "width", "height", "channels", "bit_depth"]
MEASURES = ["mean", "std", "p01", "p99", "blur"]
# Read back with dtype=str (load_stats) so that an all-digit hex string is
# never parsed as a number.
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
    "thumb",
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


# Images are processed in small batches, one step at a time over the batch
# (decode all, then measure all, then hash all, ...): interleaving OpenCV's
# decoders, filters and DCT per file keeps evicting their code and tables from
# the CPU caches, and per-file work took ~1.9x longer that way (measured on
# 20,000 8-64 px PNGs). A batch is bounded in files and in decoded bytes, so
# memory stays flat whatever the number or size of the images.
BATCH_FILES = 128
BATCH_BYTES = 64 * 2**20


def decode_file(path: str, mode: str, max_pixels: int) -> tuple[tuple, np.ndarray | None]:
    """Read and decode one file: its fields ``bytes`` to ``detail`` and the image (None if refused)."""
    try:
        data = read_bytes(path)
    except OSError as err:
        detail = f"{type(err).__name__}: {err.strerror or err}"
        return (None, None, None, None, None, None, "rejected", "unreadable", detail), None
    decoded = decode_image(data, mode, max_pixels)
    head = (
        len(data),
        hashlib.sha256(data).hexdigest(),
        decoded.width or None,
        decoded.height or None,
        decoded.channels or None,
        decoded.bit_depth or None,
        decoded.status,
        decoded.reason,
        decoded.detail,
    )
    return head, decoded.image


def measure_images(images: list[np.ndarray]) -> list[tuple]:
    """Fields ``pixel_hash`` to ``thumb`` of decoded images, measured on grey at full resolution.

    ``thumb`` is the near-duplicate signature (imagestats.thumbnail) as text.
    """
    grays = [
        image[:, :, 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        for image in images
    ]
    stats = [gray_stats(gray) for gray in grays]
    phashes = [format_phash(phash(gray)) for gray in grays]
    thumbs = [format_thumbnail(thumbnail(gray)) for gray in grays]
    pixel_hashes = [pixel_hash(image) for image in images]
    return [
        (h, p, s["mean"], s["std"], s["p01"], s["p99"], s["blur"], t)
        for h, p, s, t in zip(pixel_hashes, phashes, stats, thumbs, strict=True)
    ]


NOT_MEASURED = (None,) * 8


def ingest_file(
    path: str, mode: str, size: int, fit: str, max_pixels: int
) -> tuple[tuple, np.ndarray | None]:
    """One file's fields ``bytes`` to ``blur`` and its resized image (None if refused)."""
    head, image = decode_file(path, mode, max_pixels)
    if image is None:
        return (*head, *NOT_MEASURED), None
    return (*head, *measure_images([image])[0]), fit_square(image, size, fit)


def _open_array(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """A zero-filled uint8 .npy file of ``shape`` opened for writing (memory-mapped)."""
    if 0 in shape:  # numpy cannot memory-map an empty array
        empty = np.zeros(shape, np.uint8)
        with open(path, "wb") as fh:
            np.save(fh, empty)
        return empty
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)


LISTING_REFUSED = (None,) * 6  # bytes .. bit_depth of a file the listing refused


class _Batch:
    """Decoded images waiting to be measured, resized and written, step by step."""

    def __init__(self, records: list, array: np.ndarray, size: int, fit: str) -> None:
        self.records, self.array, self.size, self.fit = records, array, size, fit
        self.pending: list[tuple[tuple, tuple, np.ndarray]] = []
        self.nbytes = 0

    def add(self, passed: tuple, head: tuple, image: np.ndarray) -> None:
        """Queue one decoded image; measure the batch once it is full."""
        self.pending.append((passed, head, image))
        self.nbytes += image.nbytes
        if len(self.pending) >= BATCH_FILES or self.nbytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Measure, resize and store every queued image."""
        if not self.pending:
            return
        measured = measure_images([image for _, _, image in self.pending])
        for (passed, head, image), tail in zip(self.pending, measured, strict=True):
            row = passed[4]
            self.array[row] = fit_square(image, self.size, self.fit)
            self.records[row] = (*passed, *head, *tail)
        self.pending, self.nbytes = [], 0


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
    progress = _Progress(n, f"shard {shard}")
    listed = zip(
        *(part[c].tolist() for c in [*PASSED_COLUMNS, "status", "reason", "detail"]), strict=True
    )
    records: list[tuple | None] = [None] * n
    with atomic_path(images_path) as tmp_images:
        images = _open_array(str(tmp_images), (n, size, size, MODES[mode]))
        # Plain ndarray view: the memmap subclass adds overhead to every assignment.
        batch = _Batch(records, images.view(np.ndarray), size, fit)
        for row, (path, relpath, label, source, status, reason, detail) in enumerate(listed):
            passed = (path, relpath, label, source, row)
            if status != "ok":  # refused by the listing: not opened
                records[row] = (*passed, *LISTING_REFUSED, status, reason, detail, *NOT_MEASURED)
            else:
                head, image = decode_file(path, mode, max_pixels)
                if image is None:
                    records[row] = (*passed, *head, *NOT_MEASURED)
                else:
                    batch.add(passed, head, image)
            progress.update(row + 1)
        batch.flush()
        if isinstance(images, np.memmap):
            images.flush()
        del images, batch
        stats = stats_table(records)
        write_csv(stats, stats_path)
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


def run_ingest_shard(job: StageJob) -> pd.DataFrame:
    """The ingest_shard stage: decode, measure and resize this shard's share of the listing."""
    from imgpipe.image_settings import load_settings
    from imgpipe.listing import load_files

    # One job per core: the shards are the parallelism, not OpenCV's threads.
    cv2.setNumThreads(1)
    shard = int(job.wildcards["shard"])
    stats = index_shard(
        load_files(job.input["listing"]),
        shard,
        job.params["shards"],
        load_settings(job.input["image"]),  # image.size / mode resolved (auto -> inferred)
        job.params["max_pixels"],
        job.output["stats"],
        job.output["images"],
    )
    counts = stats["reason"].where(stats["status"] == "rejected").value_counts().to_dict()
    log.info("shard %d: %d kept, rejected %s", shard, int((stats["status"] == "ok").sum()), counts)
    return stats
