"""Test oracle: every near-duplicate hash pair, in memory (the clean stage streams them)."""

import numpy as np

from imgpipe.images.near_duplicates import hash_join


def hash_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) whose 64-bit hashes differ in at most ``max_distance`` bits, sorted."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    parts = list(hash_join(hashes, hashes, max_distance, same=True))
    i = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    j = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.lexsort((j, i))
    i, j = i[order].astype(np.int64), j[order].astype(np.int64)
    return i, j, np.bitwise_count(hashes[i] ^ hashes[j]).astype(np.int64)
