"""Per-image measurements the clean stage decides on (computed once, at ingest)."""

from __future__ import annotations

import functools

import cv2
import numpy as np

# Images larger than this (long side) are measured on a downscaled copy: the
# statistics below are scale-robust and decoding dominates anyway.
MEASURE_MAX_SIDE = 256
# pHash threshold margin, as a fraction of the DCT coefficients' spread (see phash).
PHASH_MARGIN = 0.05


def to_gray(image: np.ndarray) -> np.ndarray:
    """Return a uint8 single-channel view of an HxW, HxWx1 or HxWx3 (BGR) uint8 image."""
    if image.ndim == 2:
        return image
    if image.shape[2] == 1:
        return image[:, :, 0]
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _measure_copy(gray: np.ndarray) -> np.ndarray:
    long_side = max(gray.shape)
    if long_side <= MEASURE_MAX_SIDE:
        return gray
    scale = MEASURE_MAX_SIDE / long_side
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def gray_stats(gray: np.ndarray) -> dict[str, float]:
    """Brightness mean/std, 1st/99th percentiles and a blur score of a grey image (see sharpness)."""
    small = _measure_copy(np.ascontiguousarray(gray))
    # OpenCV reductions: numpy's per-call overhead dominates on small images.
    mean, std = (float(v[0, 0]) for v in cv2.meanStdDev(small))
    hist = cv2.calcHist([small], [0], None, [256], [0, 256]).ravel()
    cdf = np.cumsum(hist, dtype=np.float64) / small.size
    p01, p99 = (float(v) for v in np.searchsorted(cdf, _PERCENTILES))
    if std <= 1e-6 or min(small.shape) < 3:
        blur = 0.0 if std <= 1e-6 else float("inf")
    else:
        blur = sharpness(small)
    return {"mean": mean, "std": std, "p01": p01, "p99": p99, "blur": blur}


_PERCENTILES = np.array([0.01, 0.99])


def sharpness(gray: np.ndarray) -> float:
    """Mean squared Laplacian over mean squared gradient: about 1/edge-width^2 (0 when flat).

    Dividing by the gradient energy (not the grey-level variance) makes the
    score independent of contrast and of how much of the image is edges: a
    64 px and a 256 px icon with the same crisp outline score alike (>= ~0.5
    for text, shapes and line art; ~2 for sharp photo-like texture), while a
    Gaussian blur of sigma 1 / 2 pixels brings it to ~0.3 / ~0.1.
    """
    lap = cv2.Laplacian(gray, cv2.CV_32F)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=1)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=1)
    gradient = cv2.norm(gx, cv2.NORM_L2SQR) + cv2.norm(gy, cv2.NORM_L2SQR)
    return cv2.norm(lap, cv2.NORM_L2SQR) / gradient if gradient > 0 else 0.0


@functools.lru_cache(maxsize=1024)
def _phash_projection(n: int) -> np.ndarray:
    """8 x n matrix: box-filter resampling of n pixels to 32, then the 8 lowest DCT-II rows.

    Applied on both sides (P_h @ gray @ P_w.T) it gives the 8x8 low-frequency
    block of cv2.dct(resize(gray, 32x32, INTER_AREA)) in two small matrix
    products, without the resize and the full 32x32 DCT.
    """
    edges = np.linspace(0.0, n, _PHASH_GRID + 1)
    left, right = np.arange(n)[None, :], np.arange(1, n + 1)[None, :]
    # Overlap of source pixel [i, i+1) with target cell [edges[k], edges[k+1]).
    overlap = np.clip(
        np.minimum(right, edges[1:, None]) - np.maximum(left, edges[:-1, None]), 0, None
    )
    resample = overlap / overlap.sum(axis=1, keepdims=True)
    k, x = np.arange(8)[:, None], np.arange(_PHASH_GRID)[None, :]
    dct = np.cos(np.pi * (2 * x + 1) * k / (2 * _PHASH_GRID)) * np.sqrt(2 / _PHASH_GRID)
    dct[0] /= np.sqrt(2)  # orthonormal, as cv2.dct
    return (dct @ resample).astype(np.float32)


_PHASH_GRID = 32


def phash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a grey image (pHash, with a noise margin on the threshold).

    As pHash / imagehash.phash: shrink to 32x32 (box filter), keep the 8x8
    lowest DCT frequencies, set the bits above the median of the 63 non-DC
    ones. The threshold is raised by 5% of their spread: on plain synthetic
    images (letters, squares) symmetry makes many coefficients ~0, right at
    the median, and plain pHash flips those bits on any noise; with the
    margin a noisy copy stays within 4 bits in 99% of cases (96% without).
    """
    small = _measure_copy(gray)
    rows, cols = small.shape
    low = (_phash_projection(rows) @ small.astype(np.float32) @ _phash_projection(cols).T).ravel()
    rest = low[1:]
    # Median of the 63 non-DC coefficients is the 32nd smallest; OpenCV's std
    # (numpy's median and std cost more than the whole hash on small images).
    spread = cv2.meanStdDev(rest)[1][0, 0]
    threshold = np.partition(rest, 31)[31] + PHASH_MARGIN * spread
    return int(np.packbits(low > threshold).view(">u8")[0])


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Hamming distances between an array of 64-bit hashes and one hash."""
    x = np.bitwise_xor(a.astype(np.uint64), np.uint64(b))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
