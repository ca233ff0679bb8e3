"""The clean index, and random access to its images straight from the ingest shards on disk.

Every later stage (augment, training, evaluation, clustering, prediction) reads
images through :class:`ShardImages`: ``images[ids]`` returns those rows as one
uint8 NHWC array, read from the shards' ``.npy`` files with ``os.pread``. Only
the rows asked for are held in memory, so a job's memory follows its batch
size, never the size of the dataset. (A memory map would do the same reads,
but every page it touches then counts in the process's resident memory until
the map is dropped, which for a long training run is the whole dataset.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from imgpipe.core.atomic import read_csv

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
# A batch's rows are read with one call covering all of them when that span is at
# most SPAN_FACTOR times the bytes wanted, or SPAN_BYTES: cheaper than a call per row.
SPAN_FACTOR = 4
SPAN_BYTES = 4 * 2**20
# Ids read per chunk by ``iter_chunks`` (and by whole-set readers such as channel_stats).
CHUNK_IMAGES = 1024


def load_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read index.csv with labels and paths as text and ids, groups and rows as integers."""
    index = read_csv(
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


def class_names(index: pd.DataFrame) -> list[str]:
    """The sorted list of distinct labels."""
    return sorted(index["label"].astype(str).unique().tolist())


def label_codes(index: pd.DataFrame) -> np.ndarray:
    """Integer label per row: its position in ``class_names(index)``."""
    names = np.asarray(class_names(index))
    return np.searchsorted(names, index["label"].astype(str).to_numpy()).astype(np.int64)


class NpyRows:
    """Rows of one uint8 (N, H, W, C) ``.npy`` file, read on demand with ``os.pread``.

    The header is checked once (uint8, 4 dimensions, C order: never unpickled,
    never cast). The file is opened lazily in each process, so a reader made
    before a fork (DataLoader workers, DDP ranks) opens its own descriptor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"{self.path}: unsupported .npy format version {version}")
            self.offset = fh.tell()
        if dtype != np.uint8 or len(shape) != 4 or fortran:
            raise ValueError(f"{self.path}: expected uint8 (N, H, W, C), got {dtype} {shape}")
        self.shape: tuple[int, ...] = tuple(int(n) for n in shape)
        self.row_bytes = int(np.prod(self.shape[1:]))
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read_into(self, rows: np.ndarray, out: np.ndarray, slots: np.ndarray | None = None) -> None:
        """Fill ``out[slots[k]]`` (default ``out[k]``) with row ``rows[k]``, reading straight into ``out``.

        ``out`` is a C-contiguous uint8 (M, H, W, C) array. Runs of consecutive
        rows that land in consecutive slots are read with one call; small rows
        (thumbnails) whose span is compact are read as one span and gathered.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"{self.path}: rows outside 0..{self.shape[0] - 1}")
        slots = np.arange(len(rows)) if slots is None else np.asarray(slots, dtype=np.int64)
        if not out.flags.c_contiguous:
            raise ValueError("read_into needs a C-contiguous output array")
        fd = self._descriptor()
        low, high = int(rows.min()), int(rows.max()) + 1
        span_bytes = (high - low) * self.row_bytes
        if span_bytes <= max(SPAN_FACTOR * len(rows) * self.row_bytes, SPAN_BYTES):
            # Small rows (thumbnails): one read of the rows' whole span beats a call per row.
            span = np.empty((high - low, *self.shape[1:]), dtype=np.uint8)
            self._pread(fd, span, low)
            out[slots] = span[rows - low]
            return
        order = np.argsort(rows, kind="stable")
        ordered, targets = rows[order], slots[order]
        # A new run wherever the next wanted row is not the next row on disk, or
        # its slot is not the next slot of out.
        breaks = np.flatnonzero((np.diff(ordered) != 1) | (np.diff(targets) != 1)) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(ordered)], strict=True):
            first = int(targets[start])
            self._pread(fd, out[first : first + int(stop - start)], int(ordered[start]))

    def _pread(self, fd: int, buffer: np.ndarray, first_row: int) -> None:
        """Fill ``buffer`` with consecutive rows starting at ``first_row``."""
        offset = self.offset + first_row * self.row_bytes
        got = os.preadv(fd, [memoryview(buffer).cast("B")], offset)
        if got != buffer.nbytes:
            raise OSError(f"{self.path}: short read at row {first_row} (file truncated?)")

    def __getitem__(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        self.read_into(rows, out)
        return out

    def close(self) -> None:
        """Close this process's descriptor (reopened on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}


class ShardImages:
    """The images of an index (clean index rows: ``array``, ``row``), addressed by position.

    ``images[positions]`` returns uint8 (len(positions), H, W, C) in the order
    asked; ``images.shape`` is (len(index), H, W, C). Positions are row
    positions of the index given (for the clean index, position == id).
    """

    def __init__(self, index: pd.DataFrame):
        if len(index) == 0:
            raise ValueError("cannot read images of an empty index")
        paths, self.file_of = np.unique(index["array"].astype(str).to_numpy(), return_inverse=True)
        self.files = [NpyRows(path) for path in paths]
        self.row_of = index["row"].to_numpy(dtype=np.int64)
        first = self.files[0].shape[1:]
        for reader in self.files[1:]:
            if reader.shape[1:] != first:
                raise ValueError(f"{reader.path}: image shape {reader.shape[1:]} != {first}")
        self.shape: tuple[int, ...] = (len(index), *first)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, positions: Sequence[int] | np.ndarray | slice) -> np.ndarray:
        if isinstance(positions, slice):
            positions = np.arange(len(self))[positions]
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions outside 0..{len(self) - 1}")
        out = np.empty((len(positions), *self.shape[1:]), dtype=np.uint8)
        self.read_into(positions, out)
        return out

    def read_into(
        self, positions: np.ndarray, out: np.ndarray, slots: np.ndarray | None = None
    ) -> None:
        """Fill ``out[slots[k]]`` (default ``out[k]``) with image ``positions[k]``, no copy between.

        ``out`` is a C-contiguous uint8 array of this reader's image shape.
        """
        positions = np.asarray(positions, dtype=np.int64)
        slots = np.arange(len(positions)) if slots is None else np.asarray(slots, dtype=np.int64)
        files = self.file_of[positions]
        for f in np.unique(files):
            where = np.flatnonzero(files == f)
            self.files[f].read_into(self.row_of[positions[where]], out, slots=slots[where])


def open_images(index: pd.DataFrame) -> ShardImages:
    """Random access to the images of ``index`` (one reader per shard file)."""
    return ShardImages(index)


def load_images(index: pd.DataFrame) -> np.ndarray:
    """The images of ``index`` as one uint8 NHWC array in index order (for small subsets only)."""
    if len(index) == 0:
        raise ValueError("cannot load images of an empty index")
    return open_images(index)[np.arange(len(index))]


def iter_chunks(
    images: ShardImages | np.ndarray, ids: np.ndarray, chunk: int = CHUNK_IMAGES
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (ids, images) of at most ``chunk`` images at a time, covering ``ids`` in order."""
    ids = np.asarray(ids, dtype=np.int64)
    for start in range(0, len(ids), max(1, int(chunk))):
        part = ids[start : start + chunk]
        yield part, images[part]


# Largest number of images channel_stats reads (evenly spaced): bounded time and memory.
STATS_SAMPLE = 20_000
# Bytes of images channel_stats holds at once (1,024 16 px images, 340 of 224 px RGB).
STATS_CHUNK_BYTES = 48 * 2**20


def channel_stats(
    images: ShardImages | np.ndarray, ids: np.ndarray | None = None
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-1 scale) of uint8 NHWC images, std floored to avoid /0.

    From at most STATS_SAMPLE evenly spaced images of ``ids`` (default: all),
    read once, chunk by chunk (at most STATS_CHUNK_BYTES of images at a time):
    each channel's histogram of the 256 grey levels gives its exact sums, with
    no float copy of the pixels (a float64 copy of a chunk of 224 px photos
    would take 8x its bytes).
    """
    ids = np.arange(len(images)) if ids is None else np.asarray(ids, dtype=np.int64)
    if len(ids) > STATS_SAMPLE:
        ids = ids[np.linspace(0, len(ids) - 1, STATS_SAMPLE).round().astype(np.int64)]
    channels = images.shape[-1]
    row_bytes = int(np.prod(images.shape[1:]))
    chunk = int(np.clip(STATS_CHUNK_BYTES // max(row_bytes, 1), 1, CHUNK_IMAGES))
    counts = np.zeros((channels, 256), dtype=np.int64)
    for _, part in iter_chunks(images, ids, chunk):
        flat = part.reshape(-1, channels)
        for c in range(channels):
            counts[c] += np.bincount(flat[:, c], minlength=256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1).astype(np.float64)
    mean = (counts @ levels) / np.maximum(total, 1)
    squares = (counts * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1)
    std = np.sqrt(squares / np.maximum(total, 1))
    return mean.tolist(), np.maximum(std, 1e-3).tolist()
