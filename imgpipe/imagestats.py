"""Per-image measurements the clean stage decides on (computed once, at ingest)."""

from __future__ import annotations

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


def phash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a grey image (pHash, with a noise margin on the threshold).

    As pHash / imagehash.phash: resize to 32x32, keep the 8x8 lowest DCT
    frequencies, set the bits above the median of the 63 non-DC ones. The
    threshold is raised by 5% of their spread: on plain synthetic images
    (letters, squares) symmetry makes many coefficients ~0, right at the
    median, and plain pHash flips those bits on any noise; with the margin a
    noisy copy stays within 4 bits in 99% of cases (96% without).
    """
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    rest = low[1:]
    # Median of the 63 non-DC coefficients: the 32nd smallest (np.median is slow).
    threshold = np.partition(rest, 31)[31] + PHASH_MARGIN * rest.std()
    return int(np.packbits(low > threshold).view(">u8")[0])


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Hamming distances between an array of 64-bit hashes and one hash."""
    x = np.bitwise_xor(a.astype(np.uint64), np.uint64(b))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
