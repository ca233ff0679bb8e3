"""Ingest one shard of files.csv: decode, measure, resize into a memory-mapped array.

Files stream through in small bounded batches (see BATCH_FILES). The per-file
path is kept lean (one read, one decode, OpenCV rather than PIL, rows kept as
tuples and turned into one DataFrame at the end): on small images the fixed
per-file cost dominates.

stats.csv keeps hashes as text: ``sha256`` and ``pixel_hash`` in hex;
``load_stats`` reads them back as text.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping

import cv2
import numpy as np
import pandas as pd

from imgpipe.core.atomic import atomic_path, read_csv, write_csv
from imgpipe.core.logs import Progress
from imgpipe.images.decode import MODES, decode_image, fit_square, read_bytes
from imgpipe.images.measure import format_thumbnail, gray_stats, thumbnail

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


def decode_file(
    path: str, mode: str, max_pixels: int, hashes: bool = True
) -> tuple[tuple, np.ndarray | None]:
    """Read and decode one file: its fields ``bytes`` to ``detail`` and the image (None if refused).

    ``hashes`` False leaves ``sha256`` empty (prediction does not need it).
    """
    try:
        data = read_bytes(path)
    except OSError as err:
        detail = f"{type(err).__name__}: {err.strerror or err}"
        return (None, None, None, None, None, None, "rejected", "unreadable", detail), None
    decoded = decode_image(data, mode, max_pixels)
    head = (
        len(data),
        hashlib.sha256(data).hexdigest() if hashes else None,
        decoded.width or None,
        decoded.height or None,
        decoded.channels or None,
        decoded.bit_depth or None,
        decoded.status,
        decoded.reason,
        decoded.detail,
    )
    return head, decoded.image


def measure_images(images: list[np.ndarray], hashes: bool = True) -> list[tuple]:
    """Fields ``pixel_hash`` to ``thumb`` of decoded images, measured on grey at full resolution.

    ``thumb`` is the near-duplicate signature (imagestats.thumbnail) as text.
    ``hashes`` False leaves ``pixel_hash`` and ``thumb`` empty: the quality
    checks' measurements alone.
    """
    grays = [
        image[:, :, 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        for image in images
    ]
    stats = [gray_stats(gray) for gray in grays]
    if not hashes:
        thumbs = pixel_hashes = [None] * len(images)
    else:
        thumbs = [format_thumbnail(thumbnail(gray)) for gray in grays]
        pixel_hashes = [pixel_hash(image) for image in images]
    return [
        (h, s["mean"], s["std"], s["p01"], s["p99"], s["blur"], t)
        for h, s, t in zip(pixel_hashes, stats, thumbs, strict=True)
    ]


NOT_MEASURED = (None,) * 7  # pixel_hash .. thumb of a file that was not decoded
# The fields prepare_images gives per file: stats.csv's columns ``bytes`` to ``thumb``.
PREPARED_COLUMNS = STATS_COLUMNS[STATS_COLUMNS.index("bytes") :]


def _finish(
    pending: list[tuple[tuple, np.ndarray | None]], size: int, fit: str, hashes: bool = True
) -> Iterator[tuple[tuple, np.ndarray | None]]:
    """Measure the decoded images of a batch together, then resize each: one step at a time."""
    decoded = [image for _, image in pending if image is not None]
    measured = iter(measure_images(decoded, hashes))
    for head, image in pending:
        if image is None:
            yield (*head, *NOT_MEASURED), None
        else:
            yield (*head, *next(measured)), fit_square(image, size, fit)


def prepare_images(
    paths: Iterable[str], image_cfg: Mapping, max_pixels: int, hashes: bool = True
) -> Iterator[tuple[tuple, np.ndarray | None]]:
    """The one preprocessing path of ingest and prediction: read, decode, measure, resize.

    Yields, for each path in order, its fields (``PREPARED_COLUMNS``: bytes,
    hashes, size, status / reason / detail of the decode, the measurements clean
    decides on) and its uint8 ``size x size x C`` array in ``image_cfg``'s mode
    and fit (None when the file is refused). Files are decoded in bounded
    batches (BATCH_FILES files or BATCH_BYTES decoded bytes), so memory stays
    flat however many paths stream through. ``hashes`` False skips the
    identity fields (``sha256``, ``pixel_hash``, ``thumb``: clean's duplicate
    checks) and keeps the quality checks' measurements: what prediction needs.
    """
    size, mode, fit = int(image_cfg["size"]), image_cfg["mode"], image_cfg["fit"]
    if mode not in MODES:
        raise ValueError(f"image.mode {mode!r}: expected one of {sorted(MODES)}")
    pending: list[tuple[tuple, np.ndarray | None]] = []
    nbytes = 0
    for path in paths:
        head, image = decode_file(path, mode, max_pixels, hashes)
        pending.append((head, image))
        nbytes += 0 if image is None else image.nbytes
        if len(pending) >= BATCH_FILES or nbytes >= BATCH_BYTES:
            yield from _finish(pending, size, fit, hashes)
            pending, nbytes = [], 0
    yield from _finish(pending, size, fit, hashes)


def _open_array(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """A zero-filled uint8 .npy file of ``shape`` opened for writing (memory-mapped)."""
    if 0 in shape:  # numpy cannot memory-map an empty array
        empty = np.zeros(shape, np.uint8)
        with open(path, "wb") as fh:
            np.save(fh, empty)
        return empty
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)


LISTING_REFUSED = (None,) * 6  # bytes .. bit_depth of a file the listing refused


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
    size, mode = int(image_cfg["size"]), image_cfg["mode"]
    if mode not in MODES:
        raise ValueError(f"image.mode {mode!r}: expected one of {sorted(MODES)}")
    part = files_df.iloc[shard_positions(len(files_df), shard, shards)]
    n = len(part)
    progress = Progress(n, f"shard {shard}", unit="files")
    listed = list(
        zip(
            *(part[c].tolist() for c in [*PASSED_COLUMNS, "status", "reason", "detail"]),
            strict=True,
        )
    )
    records: list[tuple | None] = [None] * n
    done = 0
    opened = []
    for row, (path, relpath, label, source, status, reason, detail) in enumerate(listed):
        if status == "ok":
            opened.append(row)
            continue
        # Refused by the listing: not opened.
        passed = (path, relpath, label, source, row)
        records[row] = (*passed, *LISTING_REFUSED, status, reason, detail, *NOT_MEASURED)
        done += 1
        progress.update(done)
    with atomic_path(images_path) as tmp_images:
        images = _open_array(str(tmp_images), (n, size, size, MODES[mode]))
        # Plain ndarray view: the memmap subclass adds overhead to every assignment.
        array = images.view(np.ndarray)
        prepared = prepare_images((listed[row][0] for row in opened), image_cfg, max_pixels)
        for row, (fields, image) in zip(opened, prepared, strict=True):
            records[row] = (*listed[row][:4], row, *fields)
            if image is not None:
                array[row] = image
            done += 1
            progress.update(done)
        if isinstance(images, np.memmap):
            images.flush()
        del images, array
        stats = stats_table(records)
        write_csv(stats, stats_path)
    return stats


def load_stats(path: str | os.PathLike) -> pd.DataFrame:
    """Read a shard's stats.csv with hashes and text kept as strings and counts as integers."""
    dtypes = {c: str for c in TEXT_COLUMNS} | {c: "Int64" for c in INT_COLUMNS}
    return read_csv(
        path,
        dtype=dtypes,
        keep_default_na=False,
        na_values={c: [""] for c in [*INT_COLUMNS, *MEASURES]},
    )


def shard_outputs(out_dir: str | os.PathLike, shard: int) -> tuple[str, str]:
    """(stats.csv, images.npy) of ``shard`` under ``out_dir``, laid out as the workflow's results/ingest."""
    return f"{out_dir}/shard-{shard}/stats.csv", f"{out_dir}/shard-{shard}/images.npy"


def ingest_one_shard(
    listing: str | os.PathLike,
    shard: int,
    shards: int,
    settings: Mapping,
    max_pixels: int,
    stats_path: str | os.PathLike,
    images_path: str | os.PathLike,
) -> pd.DataFrame:
    """One ingest_shard job: this shard's share of files.csv, decoded on one OpenCV thread.

    One job per core: the shards are the parallelism, not OpenCV's threads.
    """
    from imgpipe.data.listing import load_files

    cv2.setNumThreads(1)
    return index_shard(
        load_files(listing), shard, shards, settings, max_pixels, stats_path, images_path
    )


def _ingest_shard_job(args: tuple) -> None:
    ingest_one_shard(*args)


def ingest_listing(
    listing: str | os.PathLike,
    settings: Mapping,
    max_pixels: int,
    out_dir: str | os.PathLike,
    shards: int,
) -> list[str]:
    """Every shard of files.csv into ``out_dir/shard-{i}/``, one fresh process per shard; the stats paths.

    What the workflow's ingest_shard jobs do, outside Snakemake (the
    benchmarks). Workers start as fresh interpreters, like Snakemake's jobs: a
    forked child inherits OpenCV's thread pool mid-state and can hang in
    cv2.setNumThreads.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [
        (listing, shard, shards, dict(settings), max_pixels, *shard_outputs(out_dir, shard))
        for shard in range(shards)
    ]
    with ProcessPoolExecutor(shards, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_ingest_shard_job, jobs))
    return [shard_outputs(out_dir, shard)[0] for shard in range(shards)]
