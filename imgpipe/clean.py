"""The clean stage: decide which ingested images to keep, from the per-shard measurements.

Every decision works on the gathered stats tables of all shards (so duplicates
between shards are found) and records one reason and a human detail per
rejected image. Order of the checks (the first that applies wins):

1. ingest / listing rejections pass through;
2. too_small, odd_aspect, too_dark, too_bright, low_information, blurry
   (the measurements of each image alone);
3. label_conflict: the same pixels under two labels, every copy rejected;
4. exact_duplicate (keep the first by source, relpath) and test_leak (a test
   image with the pixels of a training image);
5. near duplicates (see below): test_leak for test images linked to a
   training image, then the links among the rest: ``group`` is their
   connected component (split and folds keep it whole), ``near_group`` the
   star group shown to the user; ``drop`` keeps one image per star;
6. small_class: classes with fewer than min_per_class training images left.

Near duplicates: two images are linked when their thumbnails (stored at
ingest, independent of image.size) are close, at one alignment, by hash
(Hamming distance <= near_duplicate_distance) and by pixels (correlation >=
near_duplicate_correlation, same tone); see imgpipe.imagestats and
Signatures. Every linked pair is found: the hash pairs come from an exact
multi-index-hashing search (no cap per hash) and stream through a union-find,
so a crowd of identical images costs memory in proportion to the images, not
to their pairs.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from imgpipe import imagestats
from imgpipe.atomic import write_csv, write_json
from imgpipe.dataset import INDEX_COLUMNS, load_images
from imgpipe.errors import DataError
from imgpipe.ingest import load_stats
from imgpipe.logs import Progress
from imgpipe.plots import image_grid
from imgpipe.stage import StageJob

log = logging.getLogger("imgpipe")

REJECTED_COLUMNS = ["path", "relpath", "label", "source", "reason", "detail"]
# Candidate pairs handled at once (bounds memory whatever the number of pairs).
PAIR_CHUNK = 1 << 16
# Thumbnail pairs correlated at once.
PIXEL_CHUNK = 1024
# A component above this fraction of the kept images is logged and reported.
LARGE_COMPONENT = 0.01


@dataclass(frozen=True)
class CleanSettings:
    """The ``clean:`` config section's decision keys (None switches a threshold off).

    No defaults of its own: config/schema.yaml holds them (``imgpipe.settings.filled``).
    """

    min_per_class: int
    exact_duplicates: bool
    label_conflicts: bool
    near_duplicates: str
    near_duplicate_distance: int
    near_duplicate_correlation: float
    low_information: float | None
    dark: float | None
    bright: float | None
    blur: float | None
    min_side: int
    max_aspect: float

    @classmethod
    def from_config(cls, section: Mapping) -> CleanSettings:
        """Build from a defaults-filled section; a missing decision key raises (it is a bug)."""
        missing = [f.name for f in fields(cls) if f.name not in section]
        if missing:
            raise KeyError(f"CleanSettings: the section lacks {', '.join(missing)}")
        settings = cls(**{f.name: section[f.name] for f in fields(cls)})
        if settings.near_duplicates not in ("group", "drop", "off"):
            raise ValueError(
                f"near_duplicates must be group, drop or off, not {settings.near_duplicates!r}"
            )
        return settings


# ----------------------------------------------------------------------------- reading


def read_stats(
    stats_paths: Sequence[str | os.PathLike], image_paths: Sequence[str | os.PathLike]
) -> pd.DataFrame:
    """Gather the shards' stats tables, add ``shard`` and ``array``, sort by (source, relpath)."""
    if len(stats_paths) != len(image_paths):
        raise ValueError("one images.npy per stats.csv expected")
    frames = []
    for shard, (stats_path, array_path) in enumerate(zip(stats_paths, image_paths, strict=True)):
        frame = load_stats(stats_path)
        frame["shard"] = shard
        frame["array"] = str(array_path)
        frames.append(frame)
    return sort_rows(pd.concat(frames, ignore_index=True))


def sort_rows(stats: pd.DataFrame) -> pd.DataFrame:
    """Order rows by (source, relpath, path): the order ids and 'first copy' follow."""
    return stats.sort_values(["source", "relpath", "path"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- per-image checks


def _numeric(stats: pd.DataFrame, column: str) -> np.ndarray:
    return pd.to_numeric(stats[column], errors="coerce").astype("float64").to_numpy()


def quality_reasons(stats: pd.DataFrame, settings: CleanSettings) -> tuple[np.ndarray, np.ndarray]:
    """Reason and detail per row from its own measurements ('' where every check passes)."""
    n = len(stats)
    reasons = np.full(n, "", dtype=object)
    details = np.full(n, "", dtype=object)
    width, height = _numeric(stats, "width"), _numeric(stats, "height")
    short, long_ = np.minimum(width, height), np.maximum(width, height)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = long_ / short
    std, p01, p99, blur = (_numeric(stats, c) for c in ("std", "p01", "p99", "blur"))
    checks: list[tuple[str, np.ndarray, Callable[[int], str]]] = [
        (
            "too_small",
            short < settings.min_side,
            lambda i: f"min side {short[i]:g} < {settings.min_side}",
        ),
        (
            "odd_aspect",
            aspect > settings.max_aspect,
            lambda i: f"aspect {aspect[i]:.3g} > {settings.max_aspect:g}",
        ),
    ]
    # Dark / bright: 99% of the pixels lie in the dark (bright) band AND the
    # spread is no more than pixels confined to that band can have (std <= band
    # width / 2). A thin bright line on black or dark ink on white has 1% of
    # pixels or less outside the band but raises the spread above that bound.
    if settings.dark is not None:
        t_dark = settings.dark
        dark = (p99 < t_dark) & (std <= p99 / 2)
        checks.append(
            (
                "too_dark",
                dark,
                lambda i: f"p99 {p99[i]:g} < {t_dark:g}, std {std[i]:.3g} <= {p99[i] / 2:g}",
            )
        )
    if settings.bright is not None:
        t_bright = settings.bright
        bright = (p01 > t_bright) & (std <= (255 - p01) / 2)
        checks.append(
            (
                "too_bright",
                bright,
                lambda i: (
                    f"p01 {p01[i]:g} > {t_bright:g}, std {std[i]:.3g} <= {(255 - p01[i]) / 2:g}"
                ),
            )
        )
    # After dark/bright: a black or white blank says too_dark / too_bright.
    if settings.low_information is not None:
        t = settings.low_information
        checks.append(("low_information", std < t, lambda i: f"std {std[i]:.3g} < {t:g}"))
    if settings.blur is not None:
        t_blur = settings.blur
        checks.append(("blurry", blur < t_blur, lambda i: f"blur {blur[i]:.3g} < {t_blur:g}"))
    for reason, hit, describe in checks:
        for i in np.flatnonzero(hit & (reasons == "")):
            reasons[i], details[i] = reason, describe(i)
    return reasons, details


# ----------------------------------------------------------------------------- exact duplicates


def label_conflicts(pixel_hash: np.ndarray, labels: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Boolean mask of alive rows whose pixels also appear, alive, under another label."""
    frame = pd.DataFrame({"h": pixel_hash[alive], "label": labels[alive]})
    n_labels = frame.groupby("h")["label"].transform("nunique").to_numpy()
    out = np.zeros(len(alive), dtype=bool)
    out[np.flatnonzero(alive)] = n_labels > 1
    return out


def first_copies(pixel_hash: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """For each alive row, the position of the first alive row with the same pixels (-1 elsewhere)."""
    positions = np.flatnonzero(alive)
    frame = pd.DataFrame({"h": pixel_hash[positions], "pos": positions})
    first = np.full(len(alive), -1, dtype=np.int64)
    first[positions] = frame.groupby("h")["pos"].transform("min").to_numpy()
    return first


# ----------------------------------------------------------------------------- all pairs within a Hamming distance


def _bands(count: int) -> list[tuple[int, int]]:
    """Split 64 bits into ``count`` contiguous (shift, width) bands of near-equal width."""
    edges = np.linspace(0, 64, count + 1).round().astype(int)
    return [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def search_plan(
    query: np.ndarray, base: np.ndarray, max_distance: int, sample: int = 20_000
) -> tuple[list[tuple[int, int]], int]:
    """Multi-index hashing plan: bands and the radius searched in each, cheapest expected work.

    Pigeonhole: with m bands, two hashes within max_distance bits differ in at
    most floor(max_distance / m) bits on at least one band, so probing every
    band key within that radius finds every pair. Cost model per band:
    len(query) probe sets of sum_k C(width, k) keys (a probe ~ 4 candidate
    checks); the exact key matches as many base hashes as a sample of them
    shares keys (real hashes are far from uniform), each flipped key
    len(base) / 2^width.
    """
    rng = np.random.default_rng(0)
    picked = base if len(base) <= sample else rng.choice(base, sample, replace=False)
    best: tuple[float, list[tuple[int, int]], int] | None = None
    for count in range(1, min(max_distance + 1, 64) + 1):
        bands, radius = _bands(count), max_distance // count
        probes = sum(math.comb(max(w for _, w in bands), k) for k in range(radius + 1))
        if probes > 4096:
            continue
        cost = 0.0
        for shift, width in bands:
            keys = (picked >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            counts = np.unique(keys, return_counts=True)[1].astype(np.float64)
            shared = (counts**2).sum() / max(len(picked), 1) ** 2
            matches = len(base) * (shared + (probes - 1) / 2.0**width)
            cost += len(query) * (4 * probes + matches) + 2 * len(base)
        if best is None or cost < best[0]:
            best = (cost, bands, radius)
    assert best is not None  # count = max_distance + 1 always qualifies
    return best[1], best[2]


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every width-bit mask with at most ``radius`` bits set (0 first)."""
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << bit for bit in bits) for bits in itertools.combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


def _ranges(
    starts: np.ndarray, lengths: np.ndarray, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row, position) arrays covering positions starts[r] .. starts[r] + lengths[r] - 1, chunk at a time.

    Whole rows go together up to ``chunk`` positions; a longer row is split.
    """
    ends = np.cumsum(lengths)
    first, n_rows = 0, len(lengths)
    while first < n_rows:
        done = int(ends[first - 1]) if first else 0
        last = int(np.searchsorted(ends, done + chunk, side="right"))
        if last == first:  # one row longer than a chunk
            for offset in range(0, int(lengths[first]), chunk):
                count = min(chunk, int(lengths[first]) - offset)
                position = starts[first] + offset + np.arange(count, dtype=np.int64)
                yield np.full(count, first, dtype=np.int64), position
            first += 1
            continue
        rows = np.arange(first, last, dtype=np.int64)
        size = lengths[first:last]
        row = np.repeat(rows, size)
        if len(row):
            within = np.arange(len(row), dtype=np.int64) - np.repeat(np.cumsum(size) - size, size)
            yield row, starts[row] + within
        first = last


def _rechunk(
    parts: Iterator[tuple[np.ndarray, np.ndarray]], size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Join small (i, j) arrays into chunks of about ``size`` pairs (never more than 2 x size)."""
    held_i: list[np.ndarray] = []
    held_j: list[np.ndarray] = []
    count = 0
    for i, j in parts:
        if len(i) == 0:
            continue
        held_i.append(i)
        held_j.append(j)
        count += len(i)
        if count >= size:
            yield np.concatenate(held_i), np.concatenate(held_j)
            held_i, held_j, count = [], [], 0
    if count:
        yield np.concatenate(held_i), np.concatenate(held_j)


def hash_join(
    query: np.ndarray,
    base: np.ndarray,
    max_distance: int,
    same: bool = False,
    chunk: int = PAIR_CHUNK,
    plan: tuple[list[tuple[int, int]], int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (q, b) with popcount(query[q] ^ base[b]) <= max_distance, each once, in chunks.

    Multi-index hashing (see search_plan): exact, no cap on the pairs a hash
    takes part in, memory bounded by ``chunk`` pairs whatever the number of
    identical hashes. ``same``: query is base, pairs q < b only. ``plan``:
    (bands, radius) instead of search_plan's choice (any plan whose radius
    is at least max_distance // len(bands) is exact).
    """
    query, base = np.asarray(query, np.uint64), np.asarray(base, np.uint64)
    if len(query) == 0 or len(base) == 0:
        return
    bands, radius = plan or search_plan(query, base, max_distance)
    if radius < max_distance // len(bands):
        raise ValueError(
            f"a plan of {len(bands)} bands must search radius {max_distance // len(bands)}"
        )
    band_masks = [np.uint64(((1 << width) - 1) << shift) for shift, width in bands]

    def found() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for band, (shift, width) in enumerate(bands):
            mask = np.uint64((1 << width) - 1)
            keys = (base >> np.uint64(shift)) & mask
            order = np.argsort(keys, kind="stable")
            # Buckets: each distinct key, where its rows start in order, how many.
            keys, first, count = np.unique(keys[order], return_index=True, return_counts=True)
            query_keys = (query >> np.uint64(shift)) & mask
            for flip in _flip_masks(width, radius):
                targets = query_keys ^ flip
                bucket = np.minimum(np.searchsorted(keys, targets), len(keys) - 1)
                hit = keys[bucket] == targets
                lengths = np.where(hit, count[bucket], 0)
                for q, position in _ranges(first[bucket], lengths, chunk):
                    b = order[position]
                    keep = q < b if same else np.ones(len(q), dtype=bool)
                    x = query[q] ^ base[b]
                    keep &= np.bitwise_count(x) <= max_distance
                    # Report each pair in the first band where it is found.
                    for earlier in band_masks[:band]:
                        keep &= np.bitwise_count(x & earlier) > radius
                    yield q[keep], b[keep]

    yield from _rechunk(found(), chunk)


# ----------------------------------------------------------------------------- the near-duplicate test


@dataclass
class Signatures:
    """Thumbnails of n images (imagestats.thumbnail), grouped by shape, with their hashes.

    ``arrays[g]`` stacks the thumbnails of shape ``shapes[g]``; image k is
    ``arrays[kind[k]][slot[k]]``. ``hashes[s]`` is the uint64 hash of crop s
    of every image (imagestats.thumbnail_hashes). ``subpixel[k]``: the image
    is larger than its thumbnail (a thumbnail pixel spans several of its
    pixels).

    Shifts: two images are compared at the 1-pixel offsets s (crop s of one,
    crop -s of the other) unless both are sub-pixel: then one thumbnail
    pixel is several image pixels, a small shift of the image is a fraction
    of it, and they are compared unshifted with sub-pixel alignment instead.
    """

    shapes: list[tuple[int, int]]
    arrays: list[np.ndarray]
    kind: np.ndarray
    slot: np.ndarray
    hashes: dict[tuple[int, int], np.ndarray]
    subpixel: np.ndarray

    @classmethod
    def from_stats(cls, stats: pd.DataFrame) -> Signatures:
        """Parse the ``thumb`` column (every row must have one) and hash the thumbnails."""
        thumbs = [imagestats.parse_thumbnail(text) for text in stats["thumb"].astype(str)]
        n = len(thumbs)
        shapes = sorted({t.shape for t in thumbs})
        index = {shape: g for g, shape in enumerate(shapes)}
        kind = np.array([index[t.shape] for t in thumbs], dtype=np.int64)
        slot = np.zeros(n, dtype=np.int64)
        arrays = []
        hashes = {s: np.zeros(n, dtype=np.uint64) for s in imagestats.HASH_SHIFTS}
        for g in range(len(shapes)):
            rows = np.flatnonzero(kind == g)
            slot[rows] = np.arange(len(rows))
            stack = np.stack([thumbs[r] for r in rows])
            arrays.append(stack)
            for s, values in imagestats.thumbnail_hashes(stack).items():
                hashes[s][rows] = values
        thumb_h = np.array([shapes[k][0] for k in kind], dtype=np.float64).reshape(n)
        thumb_w = np.array([shapes[k][1] for k in kind], dtype=np.float64).reshape(n)
        subpixel = (_numeric(stats, "width") > thumb_w) | (_numeric(stats, "height") > thumb_h)
        return cls(shapes, arrays, kind, slot, hashes, subpixel)

    def __len__(self) -> int:
        return len(self.kind)

    def shift_distances(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """(9, P) Hamming distances of crop s of i and crop -s of j, per shift in HASH_SHIFTS.

        65 (never close) for the shifts not searched: all but (0, 0) where
        both images are sub-pixel.
        """
        i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
        out = np.empty((len(imagestats.HASH_SHIFTS), len(i)), dtype=np.int64)
        both = self.subpixel[i] & self.subpixel[j]
        for k, s in enumerate(imagestats.HASH_SHIFTS):
            out[k] = np.bitwise_count(self.hashes[s][i] ^ self.hashes[(-s[0], -s[1])][j])
            if s != (0, 0):
                out[k][both] = 65
        return out

    def hash_distance(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """The pairs' hash distance: the smallest of shift_distances."""
        return self.shift_distances(i, j).min(axis=0)

    def compare(
        self, i: np.ndarray, j: np.ndarray, max_distance: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The near-duplicate measures of each pair (i, j): (hash distance, correlation).

        The correlation is the best, over the shifts whose crop hashes are
        within max_distance, of the thumbnails' correlation at that offset
        (imagestats.thumbnail_correlations, sub-pixel alignment where both
        images are sub-pixel); -1 when no shift is. Linked: a correlation of
        at least the configured limit. Thumbnails of different shapes are
        compared at the smaller shape (box-filtered down) and at the larger
        (interpolated up), the better kept.
        """
        i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
        per_shift = self.shift_distances(i, j)
        allowed = per_shift <= max_distance
        out = np.full(len(i), -1.0)
        todo = np.flatnonzero(allowed.any(axis=0))
        shapes = np.array(self.shapes, dtype=np.int64).reshape(-1, 2)
        shape_i, shape_j = shapes[self.kind[i[todo]]], shapes[self.kind[j[todo]]]
        # Each pair is compared at the smaller and at the larger of its shapes
        # (once when they are equal); pairs with the same target go together.
        targets = np.concatenate([np.minimum(shape_i, shape_j), np.maximum(shape_i, shape_j)])
        owners = np.concatenate([todo, todo])
        for target in np.unique(targets, axis=0):
            hit = (targets == target).all(axis=1)
            where = np.unique(owners[hit])
            for start in range(0, len(where), PIXEL_CHUNK):
                part = where[start : start + PIXEL_CHUNK]
                rows, inverse = np.unique(np.concatenate([i[part], j[part]]), return_inverse=True)
                stack = self._thumbnails(rows, (int(target[0]), int(target[1])))
                r = imagestats.thumbnail_correlations(
                    stack,
                    inverse[: len(part)],
                    inverse[len(part) :],
                    self.subpixel[i[part]] & self.subpixel[j[part]],
                    allowed[:, part],
                )
                out[part] = np.maximum(out[part], r)
        return per_shift.min(axis=0), out

    def _thumbnails(self, rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(len(rows), *shape) float thumbnails of ``rows``, resampled where their shape differs."""
        out = np.empty((len(rows), *shape), dtype=np.float64)
        kinds = self.kind[rows]
        for kind in np.unique(kinds):
            where = np.flatnonzero(kinds == kind)
            stack = self.arrays[kind][self.slot[rows[where]]]
            out[where] = imagestats.resample(stack, shape) if stack.shape[1:] != shape else stack
        return out

    def candidates(
        self, query: np.ndarray, base: np.ndarray, max_distance: int, same: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Pairs (query row, base row) whose hash distance is within max_distance, each once.

        ``same``: query and base are the same (sorted) rows; pairs (i, j) with
        i < j. One multi-index search per shift and pair of image sets (the
        shifted ones only where one side is not sub-pixel); a pair is reported
        by the first search that finds it.
        """
        query, base = np.asarray(query, np.int64), np.asarray(base, np.int64)
        native = ~self.subpixel
        searches = [((0, 0), query, base, same)]
        moves = [s for s in imagestats.HASH_SHIFTS if s != (0, 0)]
        if same:
            fine, coarse = query[native[query]], query[~native[query]]
            # Among images that are not sub-pixel, shift s of (i, j) is shift
            # -s of (j, i): half of the shifts, searched both ways round.
            searches += [(s, fine, fine, False) for s in moves if s > (0, 0)]
            searches += [(s, fine, coarse, False) for s in moves]
        else:
            searches += [(s, query[native[query]], base, False) for s in moves]
            searches += [(s, query[~native[query]], base[native[base]], False) for s in moves]
        members = [(self._mask(q), self._mask(b)) for _, q, b, _ in searches]
        # One plan for every search: the shifted hashes are alike.
        plan = search_plan(self.hashes[(0, 0)][query], self.hashes[(0, 0)][base], max_distance)
        label = "near-duplicate search" if same else "test-leak search"
        progress = Progress(len(searches), label, unit="hash searches")
        for k, (shift, q_rows, b_rows, self_search) in enumerate(searches):
            progress.update(k)
            opposite = (-shift[0], -shift[1])
            q_hashes, b_hashes = self.hashes[shift][q_rows], self.hashes[opposite][b_rows]
            found = hash_join(q_hashes, b_hashes, max_distance, same=self_search, plan=plan)
            for q, b in found:
                i, j = q_rows[q], b_rows[b]
                keep = i != j
                if same and not self_search:
                    # Both ways round in this search: keep the (small, large) one.
                    reverse = (
                        members[k][0][j] & members[k][1][i] & self._close(j, i, shift, max_distance)
                    )
                    keep &= ~reverse | (i < j)
                for (earlier, _, _, _), (in_q, in_b) in zip(searches[:k], members[:k], strict=True):
                    found = in_q[i] & in_b[j] & self._close(i, j, earlier, max_distance)
                    if same:
                        found |= in_q[j] & in_b[i] & self._close(j, i, earlier, max_distance)
                    keep &= ~found
                i, j = i[keep], j[keep]
                if same:
                    i, j = np.minimum(i, j), np.maximum(i, j)
                yield i, j
        progress.update(len(searches))

    def _mask(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros(len(self), dtype=bool)
        out[rows] = True
        return out

    def _close(
        self, i: np.ndarray, j: np.ndarray, shift: tuple[int, int], max_distance: int
    ) -> np.ndarray:
        other = self.hashes[(-shift[0], -shift[1])]
        return np.bitwise_count(self.hashes[shift][i] ^ other[j]) <= max_distance


class UnionFind:
    """Connected components of n rows, merged a batch of links at a time (vectorised)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, rows: np.ndarray) -> np.ndarray:
        """The root of each row (path compression on the rows asked)."""
        roots = self.parent[rows]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self.parent[rows] = roots
        return roots

    def union(self, i: np.ndarray, j: np.ndarray) -> None:
        """Merge the components of each pair (i, j); a component's root is its smallest row."""
        ri, rj = self.find(i), self.find(j)
        keep = ri != rj
        if not keep.any():
            return
        nodes, inverse = np.unique(np.concatenate([ri[keep], rj[keep]]), return_inverse=True)
        half = int(keep.sum())
        graph = coo_matrix(
            (np.ones(half), (inverse[:half], inverse[half:])), shape=(len(nodes), len(nodes))
        )
        labels = connected_components(graph, directed=False)[1]
        smallest = np.full(labels.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(smallest, labels, nodes)
        self.parent[nodes] = smallest[labels]

    def labels(self) -> np.ndarray:
        """The root (smallest row) of every row's component."""
        return self.find(np.arange(len(self.parent)))


@dataclass
class NearLinks:
    """The near-duplicate links of n rows: components, star groups and the work it took."""

    component: np.ndarray  # smallest row of the component
    leader: np.ndarray  # star group leader (smallest row of the star)
    leader_distance: np.ndarray  # hash distance to the leader (0 for leaders)
    leader_correlation: np.ndarray  # correlation with the leader (1 for leaders)
    candidate_pairs: int
    correlations_computed: int


def _linked(
    sig: Signatures,
    i: np.ndarray,
    j: np.ndarray,
    limits: tuple[int, float],
    counter: list[int],
) -> np.ndarray:
    counter[0] += len(i)
    return sig.compare(i, j, limits[0])[1] >= limits[1]


def _merge_chunk(
    sig: Signatures,
    rows: np.ndarray,
    union: UnionFind,
    pair: tuple[np.ndarray, np.ndarray],
    limits: tuple[int, float],
    computed: list[int],
) -> None:
    """Compare the candidate pairs (positions in rows) that join two components; merge the linked.

    Where many pairs reach the same component (a crowd of copies), one pair
    per component is compared first and the rest only if still open, so a
    crowd costs one comparison per image, not one per pair.
    """
    i, j = pair
    while True:
        open_ = union.find(i) != union.find(j)
        i, j = i[open_], j[open_]
        if len(i) == 0:
            return
        pick = np.unique(union.find(j), return_index=True)[1]
        if 2 * len(pick) > len(i):
            pick = np.arange(len(i))
        linked = _linked(sig, rows[i[pick]], rows[j[pick]], limits, computed)
        union.union(i[pick][linked], j[pick][linked])
        if len(pick) == len(i):
            return
        rest = np.ones(len(i), dtype=bool)
        rest[pick] = False
        i, j = i[rest], j[rest]
        if not linked.any():  # nothing merged: compare the rest at once
            linked = _linked(sig, rows[i], rows[j], limits, computed)
            union.union(i[linked], j[linked])
            return


def link_components(
    sig: Signatures, rows: np.ndarray, max_distance: int, min_correlation: float
) -> NearLinks:
    """Connected components and star groups of the links among ``rows`` (sorted positions in sig).

    Linked: Signatures.compare's correlation >= min_correlation (with crop
    hashes within max_distance). Candidate pairs stream from the hash index
    chunk by chunk into a union-find; a pair whose rows are already connected
    is never compared. Star groups (what the report shows) are then drawn
    inside each component: in row order, a row not yet taken leads and takes
    every untaken row it is linked to, so each member is linked to its leader
    and a chain never makes one big star. Results are indexed like ``rows``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    limits = (max_distance, min_correlation)
    union = UnionFind(len(rows))
    computed = [0]
    pairs = 0
    for i, j in sig.candidates(rows, rows, max_distance, same=True):
        pairs += len(i)
        pair = (np.searchsorted(rows, i), np.searchsorted(rows, j))
        _merge_chunk(sig, rows, union, pair, limits, computed)
    component = union.labels()
    leader, distance, correlation = _stars(sig, rows, component, limits, computed)
    return NearLinks(component, leader, distance, correlation, pairs, computed[0])


def _stars(
    sig: Signatures,
    rows: np.ndarray,
    component: np.ndarray,
    limits: tuple[int, float],
    computed: list[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leader, hash distance and correlation to the leader of every row (see link_components)."""
    n = len(rows)
    leader = np.arange(n, dtype=np.int64)
    distance = np.zeros(n, dtype=np.int64)
    correlation = np.ones(n, dtype=np.float64)
    sizes = np.bincount(component, minlength=n)
    # A component of two is one link: the first row leads.
    pair_members = np.flatnonzero((sizes[component] == 2) & (component != np.arange(n)))
    leader[pair_members] = component[pair_members]
    if len(pair_members):
        computed[0] += len(pair_members)
        distance[pair_members], correlation[pair_members] = sig.compare(
            rows[component[pair_members]], rows[pair_members], limits[0]
        )
    members = np.argsort(component, kind="stable")
    starts = np.searchsorted(component[members], np.arange(n + 1))
    for root in np.flatnonzero(sizes > 2):
        group = members[starts[root] : starts[root + 1]]  # in row order
        untaken = np.ones(len(group), dtype=bool)
        for k in range(len(group)):
            if not untaken[k]:
                continue
            untaken[k] = False
            others = np.flatnonzero(untaken)
            if len(others) == 0:
                break
            lead = np.full(len(others), rows[group[k]])
            close = sig.hash_distance(lead, rows[group[others]]) <= limits[0]
            others = others[close]
            if len(others) == 0:
                continue
            computed[0] += len(others)
            d, r = sig.compare(lead[: len(others)], rows[group[others]], limits[0])
            taken = r >= limits[1]
            leader[group[others[taken]]] = group[k]
            distance[group[others[taken]]] = d[taken]
            correlation[group[others[taken]]] = r[taken]
            untaken[others[taken]] = False
    return leader, distance, correlation


def find_test_leaks(
    sig: Signatures,
    test_rows: np.ndarray,
    train_rows: np.ndarray,
    max_distance: int,
    min_correlation: float,
) -> dict[int, tuple[int, int, float]]:
    """Test rows linked to any training row: {test row: (training row, hash distance, correlation)}.

    Searches test hashes against training hashes only; a test row already
    found leaking is not compared again.
    """
    leaks: dict[int, tuple[int, int, float]] = {}
    leaked = np.zeros(len(sig), dtype=bool)
    test_rows, train_rows = np.asarray(test_rows), np.asarray(train_rows)
    for t, r in sig.candidates(test_rows, train_rows, max_distance, same=False):
        # One pair per test row first, then the rest for the rows still clean.
        for attempt in range(2):
            open_ = ~leaked[t]
            t, r = t[open_], r[open_]
            if len(t) == 0:
                break
            pick = np.unique(t, return_index=True)[1] if attempt == 0 else np.arange(len(t))
            d, corr = sig.compare(t[pick], r[pick], max_distance)
            for k in np.flatnonzero(corr >= min_correlation):
                row = int(t[pick][k])
                if not leaked[row]:
                    leaked[row] = True
                    leaks[row] = (int(r[pick][k]), int(d[k]), float(corr[k]))
            rest = np.ones(len(t), dtype=bool)
            rest[pick] = False
            t, r = t[rest], r[rest]
    return leaks


def component_sizes(component: np.ndarray) -> dict[str, int]:
    """Component statistics: components above one image, images in them, the largest size."""
    counts = np.unique(component, return_counts=True)[1] if len(component) else np.zeros(0, int)
    return {
        "components_above_one": int((counts > 1).sum()),
        "images_in_components_above_one": int(counts[counts > 1].sum()),
        "max_component_size": int(counts.max()) if len(counts) else 0,
    }


def group_sizes(group: np.ndarray) -> dict[str, int]:
    """Near-duplicate group statistics: number of groups, groups above one image, largest."""
    if len(group) == 0:
        return {
            "groups": 0,
            "groups_above_one": 0,
            "images_in_groups_above_one": 0,
            "max_group_size": 0,
        }
    counts = np.unique(group, return_counts=True)[1]
    return {
        "groups": int(len(counts)),
        "groups_above_one": int((counts > 1).sum()),
        "images_in_groups_above_one": int(counts[counts > 1].sum()),
        "max_group_size": int(counts.max()),
    }


# ----------------------------------------------------------------------------- decisions


@dataclass
class Decisions:
    """Per-row outcome of the clean stage (rows in (source, relpath) order)."""

    stats: pd.DataFrame
    reason: np.ndarray  # '' for kept rows
    detail: np.ndarray
    group: np.ndarray  # smallest position of the row's near-duplicate component
    near_group: np.ndarray  # position of the row's star-group leader
    near_stats: dict | None = None  # work done by the near-duplicate search

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask of kept rows."""
        return self.reason == ""


def _reject(
    decisions: Decisions, rows: np.ndarray, reason: str, details: Sequence[str] | str
) -> None:
    rows = np.asarray(rows, dtype=np.int64)
    decisions.reason[rows] = reason
    decisions.detail[rows] = (
        details if isinstance(details, str) else np.asarray(details, dtype=object)
    )


def decide(stats: pd.DataFrame, settings: CleanSettings) -> Decisions:
    """Apply every check to the gathered stats and return the outcome, rows in (source, relpath) order."""
    stats = sort_rows(stats)
    n = len(stats)
    paths = stats["path"].astype(str).to_numpy()
    labels = stats["label"].astype(str).to_numpy()
    is_test = (stats["source"].astype(str) == "test").to_numpy()
    decisions = Decisions(
        stats=stats,
        reason=np.full(n, "", dtype=object),
        detail=np.full(n, "", dtype=object),
        group=np.arange(n, dtype=np.int64),
        near_group=np.arange(n, dtype=np.int64),
    )

    ingest_rejected = (stats["status"].astype(str) == "rejected").to_numpy()
    decisions.reason[ingest_rejected] = stats["reason"].astype(str).to_numpy()[ingest_rejected]
    decisions.detail[ingest_rejected] = stats["detail"].astype(str).to_numpy()[ingest_rejected]
    decisions.reason[ingest_rejected & (decisions.reason == "")] = "unreadable"

    quality, quality_detail = quality_reasons(stats, settings)
    hit = decisions.kept & (quality != "")
    decisions.reason[hit], decisions.detail[hit] = quality[hit], quality_detail[hit]

    pixel_hash = stats["pixel_hash"].astype(str).to_numpy().astype(object)
    # A row without a hash (not expected for decoded images) matches nothing.
    missing = np.flatnonzero(pixel_hash == "")
    pixel_hash[missing] = [f"missing:{row}" for row in missing]
    _exact_checks(decisions, pixel_hash, labels, paths, is_test, settings)
    if settings.near_duplicates != "off":
        _near_checks(decisions, paths, is_test, settings)
    _small_classes(decisions, labels, is_test, settings)
    return decisions


def _exact_checks(
    decisions: Decisions,
    pixel_hash: np.ndarray,
    labels: np.ndarray,
    paths: np.ndarray,
    is_test: np.ndarray,
    settings: CleanSettings,
) -> None:
    if settings.label_conflicts:
        conflict = np.flatnonzero(label_conflicts(pixel_hash, labels, decisions.kept))
        # Per pixel hash, the first row of each label (rows are in path order).
        firsts: dict[str, dict[str, int]] = {}
        for row in conflict:
            firsts.setdefault(pixel_hash[row], {}).setdefault(labels[row], row)
        for row in conflict:
            other = next(r for label, r in firsts[pixel_hash[row]].items() if label != labels[row])
            _reject(
                decisions,
                [row],
                "label_conflict",
                f"same pixels as {paths[other]} labelled {labels[other]!r}",
            )
    # A test image with the pixels of a training image leaks: always checked.
    train_first = first_copies(pixel_hash, decisions.kept & ~is_test)
    first_by_hash = dict(
        zip(pixel_hash[train_first >= 0], train_first[train_first >= 0], strict=True)
    )
    for row in np.flatnonzero(decisions.kept & is_test):
        source_row = first_by_hash.get(pixel_hash[row])
        if source_row is not None:
            _reject(
                decisions, [row], "test_leak", f"same pixels as training image {paths[source_row]}"
            )
    if settings.exact_duplicates:
        first = first_copies(pixel_hash, decisions.kept)
        copies = np.flatnonzero(decisions.kept & (first >= 0) & (first != np.arange(len(first))))
        _reject(
            decisions,
            copies,
            "exact_duplicate",
            [f"duplicate of {paths[first[r]]}" for r in copies],
        )


def _near_checks(
    decisions: Decisions, paths: np.ndarray, is_test: np.ndarray, settings: CleanSettings
) -> None:
    if "thumb" not in decisions.stats:
        raise DataError("stats.csv has no thumb column: rerun ingest (near duplicates need it)")
    # A row without a thumbnail (not expected for decoded images) matches nothing.
    has_thumb = np.array([":" in str(text) for text in decisions.stats["thumb"]], dtype=bool)
    alive = np.flatnonzero(decisions.kept & has_thumb)
    sig = Signatures.from_stats(decisions.stats.iloc[alive])
    distance, correlation = settings.near_duplicate_distance, settings.near_duplicate_correlation

    def measures(d: int, r: float) -> str:
        return f"hash distance {d}, correlation {r:.4f}"

    local_test = np.flatnonzero(is_test[alive])
    local_train = np.flatnonzero(~is_test[alive])
    leaks = find_test_leaks(sig, local_test, local_train, distance, correlation)
    for test_row, (train_row, d, r) in sorted(leaks.items()):
        detail = f"near duplicate of training image {paths[alive[train_row]]} ({measures(d, r)})"
        _reject(decisions, [alive[test_row]], "test_leak", detail)

    members = np.flatnonzero(decisions.kept[alive])
    links = link_components(sig, members, distance, correlation)
    positions = alive[members]
    decisions.group[positions] = positions[links.component]
    decisions.near_group[positions] = positions[links.leader]
    decisions.near_stats = {
        "candidate_pairs": links.candidate_pairs,
        "correlations_computed": links.correlations_computed,
    }
    if settings.near_duplicates == "drop":
        # Leaders are never linked to each other (a leader takes every
        # untaken row it is linked to), so the kept images are singletons.
        for k in np.flatnonzero(links.leader != np.arange(len(members))):
            lead = positions[links.leader[k]]
            how = measures(links.leader_distance[k], links.leader_correlation[k])
            _reject(
                decisions,
                [positions[k]],
                "near_duplicate",
                f"near duplicate of {paths[lead]} ({how})",
            )
        decisions.group[positions] = positions
        decisions.near_group[positions] = positions


def _small_classes(
    decisions: Decisions, labels: np.ndarray, is_test: np.ndarray, settings: CleanSettings
) -> None:
    counts = pd.Series(labels[decisions.kept & ~is_test]).value_counts()
    for label in sorted(set(labels[decisions.kept])):
        count = int(counts.get(label, 0))
        if count < settings.min_per_class:
            rows = np.flatnonzero(decisions.kept & (labels == label))
            detail = f"class {label!r} keeps {count} training image(s) < min_per_class {settings.min_per_class}"
            _reject(decisions, rows, "small_class", detail)


def check_trainable(decisions: Decisions) -> None:
    """Raise DataError when nothing survives or fewer than two classes do."""
    stats, kept = decisions.stats, decisions.kept
    if not kept.any():
        counts = pd.Series(decisions.reason).value_counts()
        why = ", ".join(f"{reason} {count}" for reason, count in counts.items())
        raise DataError(
            f"no image survived cleaning ({len(stats)} listed; rejected: {why or 'none listed'})"
        )
    training = kept & (stats["source"].astype(str) != "test").to_numpy()
    classes = sorted(set(stats["label"].astype(str).to_numpy()[training]))
    if len(classes) < 2:
        raise DataError(
            f"only 1 class ({classes[0]!r}) survived cleaning; training needs at least two "
            "(see results/clean/rejected.csv)"
        )


# ----------------------------------------------------------------------------- outputs


def index_table(decisions: Decisions) -> pd.DataFrame:
    """The survivors with ids 0..N-1 in (source, relpath) order.

    ``group``: smallest id of the row's near-duplicate component (the
    connected component of linked pairs); ``near_group``: smallest id of its
    star group (the leader).
    """
    kept = decisions.stats[decisions.kept].reset_index(drop=True).copy()
    kept.insert(0, "id", np.arange(len(kept), dtype=np.int64))
    ids = pd.Series(kept["id"].to_numpy())
    for name in ("group", "near_group"):
        owner = getattr(decisions, name)[decisions.kept]
        kept[name] = ids.groupby(owner).transform("min").to_numpy()
    for name in ("shard", "row"):
        kept[name] = kept[name].astype(np.int64)
    return kept[INDEX_COLUMNS]


def rejected_table(decisions: Decisions) -> pd.DataFrame:
    """The rejected rows with reason and detail, in (source, relpath) order."""
    mask = ~decisions.kept
    table = decisions.stats.loc[mask, ["path", "relpath", "label", "source"]].copy()
    table["reason"], table["detail"] = decisions.reason[mask], decisions.detail[mask]
    return table.reset_index(drop=True)


def summary(decisions: Decisions, settings: CleanSettings) -> dict:
    """Counts per class kept, per reason and per class rejected, totals, group sizes, leakage, settings."""
    stats, kept = decisions.stats, decisions.kept
    labels = stats["label"].astype(str).to_numpy()
    reasons = decisions.reason[~kept]

    def counts(values: np.ndarray) -> dict[str, int]:
        return {str(k): int(v) for k, v in sorted(pd.Series(values).value_counts().items())}

    index = index_table(decisions)
    return {
        "total": {"listed": len(stats), "kept": int(kept.sum()), "rejected": int((~kept).sum())},
        "kept_per_class": counts(labels[kept]),
        "kept_per_source": counts(stats["source"].astype(str).to_numpy()[kept]),
        "rejected_per_reason": counts(reasons),
        "rejected_per_class": counts(labels[~kept]),
        "near_duplicates": {
            "mode": settings.near_duplicates,
            **group_sizes(index["near_group"].to_numpy()),
            **component_sizes(index["group"].to_numpy()),
            "large_components": large_components(index),
            **(decisions.near_stats or {}),
        },
        "leakage": {"test_leak": int((reasons == "test_leak").sum())},
        "settings": asdict(settings),
    }


def large_components(index: pd.DataFrame, examples: int = 5) -> list[dict]:
    """Components (of 2+ images) above LARGE_COMPONENT of the kept images: group id, size, a few paths."""
    sizes = index.groupby("group").size()
    big = sizes[(sizes > 1) & (sizes > LARGE_COMPONENT * len(index))]
    big = big.sort_values(ascending=False, kind="stable")
    return [
        {
            "group": int(group),
            "size": int(size),
            "examples": index.loc[index["group"] == group, "path"].head(examples).tolist(),
        }
        for group, size in big.items()
    ]


def examples_figure(decisions: Decisions, path: str | os.PathLike, per_reason: int = 8) -> None:
    """Save a PNG grid of rejected images, one row per reason with pixels (decode failures have none)."""
    ingest_rejected = (decisions.stats["status"].astype(str) == "rejected").to_numpy()
    shown = ~decisions.kept & ~ingest_rejected
    rows, titles = [], []
    for reason in sorted(set(decisions.reason[shown])):
        members = np.flatnonzero(shown & (decisions.reason == reason))
        rows.append(list(load_images(decisions.stats.iloc[members[:per_reason]])))
        titles.append(f"{reason}\n{len(members)} image(s)")
    image_grid(rows, path, row_titles=titles, empty_text="no image rejected by the clean checks")


def run_clean(job: StageJob) -> dict:
    """The clean stage: decide on every listed file of every shard; write index, rejections, summary."""
    settings = CleanSettings.from_config(job.params["clean"])
    result = clean_shards(
        job.input["stats"],
        job.input["images"],
        job.output,
        settings,
        job.params["examples_per_reason"],
    )
    log.info("clean: %s", result["total"])
    log.info("rejected per reason: %s", result["rejected_per_reason"])
    log.info("near duplicates: %s", result["near_duplicates"])
    return result


def clean_shards(
    stats_paths: Sequence[str | os.PathLike],
    image_paths: Sequence[str | os.PathLike],
    outputs: Mapping[str, str | os.PathLike],
    settings: CleanSettings,
    examples_per_reason: int = 8,
) -> dict:
    """Read the shards, decide, write index / rejected / summary / examples; return the summary.

    ``outputs`` maps index, rejected, summary and examples to paths. A
    DataError stops the stage before anything is written when nothing, or a
    single class, survives.
    """
    stats = read_stats(stats_paths, image_paths)
    decisions = decide(stats, settings)
    check_trainable(decisions)
    result = summary(decisions, settings)
    for component in result["near_duplicates"]["large_components"]:
        log.warning(
            "near-duplicate component of %d images (over %g%% of the %d kept, kept together in "
            "split and folds), e.g. %s",
            component["size"],
            100 * LARGE_COMPONENT,
            result["total"]["kept"],
            ", ".join(component["examples"]),
        )
    write_csv(index_table(decisions), outputs["index"])
    write_csv(rejected_table(decisions), outputs["rejected"])
    write_json(result, outputs["summary"])
    examples_figure(decisions, outputs["examples"], examples_per_reason)
    return result
