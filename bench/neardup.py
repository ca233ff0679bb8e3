"""Benchmark: all pairs of 64-bit hashes within a Hamming distance, index vs brute force.

The clean stage links near duplicates by searching every pair of thumbnail
hashes within ``clean.near_duplicate_distance`` bits (imgpipe.images.near_duplicates.hash_join:
multi-index hashing, exact, no cap on the pairs a hash takes part in). This
times it on a realistic mix of hashes, in one run, side by side with:

(a) a brute-force numpy scan (every pair's popcount, in blocks of rows);
(b) faiss IndexBinaryFlat.range_search (brute force in C++), one thread;
(c) faiss IndexBinaryMultiHash.range_search (multi-index hashing in C++), one
    thread, with as many tables and bit flips as make it exact.

The hashes: mostly random, plus near copies of some of them (1 to
max-distance bits flipped) and a crowd of near-identical hashes (a burst of
video frames), whose pairs all have to be found. Every method must return the
same pairs. Prints the figures and ends with the index / brute-force ratio.
No assertions on time.

    .venv/bin/python bench/neardup.py [--n 100000] [--distance 5] [--crowd 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imgpipe.images import near_duplicates  # noqa: E402


def make_hashes(n: int, distance: int, crowd: int, near: float, seed: int = 0) -> np.ndarray:
    """n hashes: random ones, near copies of some (1..distance bits flipped), a crowd of one hash."""
    rng = np.random.default_rng(seed)
    n_near = int(near * n)
    n_random = n - n_near - crowd
    hashes = rng.integers(0, 2**64, size=n_random, dtype=np.uint64)
    sources = hashes[rng.integers(0, n_random, size=n_near)]
    flips = np.zeros(n_near, dtype=np.uint64)
    for k in range(n_near):
        bits = rng.choice(64, size=int(rng.integers(1, distance + 1)), replace=False)
        flips[k] = np.uint64(sum(1 << int(b) for b in bits))
    centre = rng.integers(0, 2**64, dtype=np.uint64)
    # A crowd: one hash, most members identical, some with one or two bits off.
    noise = rng.integers(0, 64, size=(crowd, 2))
    off = rng.random((crowd, 2)) < [0.2, 0.05]
    crowd_hashes = np.full(crowd, centre, dtype=np.uint64)
    for column in range(2):
        crowd_hashes ^= np.where(
            off[:, column], np.uint64(1) << noise[:, column].astype(np.uint64), 0
        )
    out = np.concatenate([hashes, sources ^ flips, crowd_hashes])
    return out[rng.permutation(len(out))]


def pair_keys(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Sorted unique i * n + j of pairs normalised to i < j."""
    lo, hi = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    keep = lo != hi
    return np.unique(lo[keep] * n + hi[keep])


def by_index(hashes: np.ndarray, distance: int) -> np.ndarray:
    """imgpipe.images.near_duplicates.hash_join over all pairs (streamed chunks)."""
    parts = [
        i * len(hashes) + j
        for i, j in near_duplicates.hash_join(hashes, hashes, distance, same=True)
    ]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def by_brute_force(hashes: np.ndarray, distance: int, block: int = 64) -> np.ndarray:
    """Every pair's popcount with numpy, a block of rows against all later rows at a time."""
    n = len(hashes)
    found = []
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        later = hashes[start:]
        close = np.bitwise_count(hashes[rows, None] ^ later[None, :]) <= distance
        i, j = np.nonzero(close)
        i, j = rows[i], start + j
        keep = j > i
        found.append(i[keep] * n + j[keep])
    return np.sort(np.concatenate(found))


def as_bytes(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes as faiss binary vectors (n, 8) uint8."""
    return np.ascontiguousarray(hashes).view(np.uint8).reshape(-1, 8)


def by_faiss(index, hashes: np.ndarray, distance: int, batch: int = 4096) -> np.ndarray:
    """range_search of every hash in a faiss binary index (radius is exclusive), in batches."""
    data = as_bytes(hashes)
    index.add(data)
    found = []
    for start in range(0, len(data), batch):
        lims, _, ids = index.range_search(data[start : start + batch], distance + 1)
        rows = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        found.append(pair_keys(rows, ids, len(hashes)))
    return np.unique(np.concatenate(found))


def timed(label: str, run, results: dict) -> None:
    """Run, time and keep the pairs of one method; print its line."""
    tracemalloc.start()
    start = time.perf_counter()
    pairs = run()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    results[label] = (seconds, pairs)
    print(f"  {label:58s} {seconds:8.2f} s  {len(pairs):>10,d} pairs  peak {peak / 2**20:6.0f} MB")


def main() -> None:
    """Build the hashes, run every method, print the figures and the ratio."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="number of hashes")
    parser.add_argument("--distance", type=int, default=5, help="largest Hamming distance")
    parser.add_argument("--crowd", type=int, default=2000, help="hashes in the crowd")
    parser.add_argument("--near", type=float, default=0.05, help="share of near copies")
    parser.add_argument("--skip-faiss", action="store_true")
    args = parser.parse_args()

    hashes = make_hashes(args.n, args.distance, args.crowd, args.near)
    bands, radius = near_duplicates.search_plan(hashes, hashes, args.distance)
    print(
        f"{args.n:,d} hashes ({args.n - int(args.near * args.n) - args.crowd:,d} random, "
        f"{int(args.near * args.n):,d} near copies, a crowd of {args.crowd:,d}), "
        f"max distance {args.distance}; index plan: {len(bands)} bands, radius {radius}"
    )
    results: dict[str, tuple[float, np.ndarray]] = {}
    timed(
        "index: imgpipe.images.near_duplicates.hash_join (multi-index hashing)",
        lambda: by_index(hashes, args.distance),
        results,
    )
    timed(
        "brute force: numpy popcount of every pair",
        lambda: by_brute_force(hashes, args.distance),
        results,
    )
    if not args.skip_faiss:
        import faiss

        faiss.omp_set_num_threads(1)
        timed(
            "faiss IndexBinaryFlat.range_search (brute force, 1 thread)",
            lambda: by_faiss(faiss.IndexBinaryFlat(64), hashes, args.distance),
            results,
        )
        tables = args.distance // 2 + 1  # each table searched within 2 bits: exact
        multi = faiss.IndexBinaryMultiHash(64, tables, 64 // tables)
        multi.nflip = args.distance // tables
        timed(
            f"faiss IndexBinaryMultiHash.range_search ({tables} x {64 // tables} bits, "
            f"{multi.nflip} flips)",
            lambda: by_faiss(multi, hashes, args.distance),
            results,
        )
    reference = results["brute force: numpy popcount of every pair"][1]
    for label, (_, pairs) in results.items():
        same = np.array_equal(pairs, reference)
        print(f"  same pairs as the brute force: {same!s:5s} {label}")
    index_s = results["index: imgpipe.images.near_duplicates.hash_join (multi-index hashing)"][0]
    brute_s = results["brute force: numpy popcount of every pair"][0]
    print(f"neardup index vs brute force: ratio {brute_s / index_s:.1f}")


if __name__ == "__main__":
    main()
