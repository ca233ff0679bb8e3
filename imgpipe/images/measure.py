"""Per-image measurements the clean stage decides on (computed once, at ingest)."""

from __future__ import annotations

import base64
import functools

import cv2
import numpy as np

# Images larger than this (long side) are measured on a downscaled copy: the
# statistics below are scale-robust and decoding dominates anyway.
MEASURE_MAX_SIDE = 256
# Hash threshold margin, as a fraction of the DCT coefficients' spread (see thumbnail_hashes).
PHASH_MARGIN = 0.05


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


# ----------------------------------------------------------------------------- near-duplicate signature
#
# The near-duplicate test (imgpipe.images.quality.Signatures) compares small grey
# thumbnails stored at ingest (each side min(side, THUMB_SIDE), box-filtered),
# independent of image.size. Two images are linked when, at one alignment,
#
# - their 64-bit hashes are within clean.near_duplicate_distance bits: the
#   pHash of the thumbnail (or of a 1-pixel crop of it, HASH_SHIFTS),
#   resampled to 8 x 8 and blurred (HASH_BLUR thumbnail pixels, at least
#   HASH_BLUR_MIN grid pixels), so that a JPEG re-encode, a one-pixel resize
#   or a one-pixel shift of a tiny image stays within a few bits; a shift by s
#   shows the same content in crop s of the original and crop -s of the copy;
# - and the blurred (PIXEL_BLUR) overlapping parts correlate (Pearson's r) at
#   least clean.near_duplicate_correlation, with the same tone (brightness
#   within TONE_MEAN grey levels, contrast within TONE_CONTRAST).
#
# The 1-pixel alignments are tried unless both images are larger than their
# thumbnails: then a thumbnail pixel spans several image pixels, a small
# shift of the image is a fraction of one, and instead a sub-pixel
# translation is compensated (one linearised Lucas-Kanade step). Thumbnails
# at their images' own resolution get no sub-pixel freedom: it would let
# distinct 8 x 8 digits match.

THUMB_SIDE = 16
HASH_BLUR = 1.2
HASH_BLUR_MIN = 0.8
PIXEL_BLUR = 0.7
TONE_MEAN = 10.0
TONE_CONTRAST = 0.85
HASH_SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """The near-duplicate signature: a uint8 grey copy, each side min(side, THUMB_SIDE), box-filtered."""
    height, width = gray.shape
    size = (min(width, THUMB_SIDE), min(height, THUMB_SIDE))
    small = _measure_copy(gray)
    if small.shape[0] < size[1] or small.shape[1] < size[0]:
        small = gray  # a long thin image: its measured copy is narrower than the thumbnail
    if small.shape == (size[1], size[0]):
        return np.ascontiguousarray(small)
    return cv2.resize(small, size, interpolation=cv2.INTER_AREA)


def format_thumbnail(thumb: np.ndarray) -> str:
    """A thumbnail as text for stats.csv: ``WxH:`` and its bytes in base64."""
    height, width = thumb.shape
    return f"{width}x{height}:" + base64.b64encode(np.ascontiguousarray(thumb).tobytes()).decode()


def parse_thumbnail(text: str) -> np.ndarray:
    """The uint8 array of a ``WxH:base64`` thumbnail (see format_thumbnail)."""
    size, _, data = text.partition(":")
    width, height = (int(v) for v in size.split("x"))
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width)


def crop(stack: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """The part of (..., h, w) arrays that overlaps a copy moved by ``shift`` = (dy, dx) pixels.

    crop(a, s) and crop(b, -s) have the same shape; where b is a moved by -s,
    they hold the same pixels.
    """
    dy, dx = shift
    h, w = stack.shape[-2:]
    return stack[..., max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)]


def usable_shift(shape: tuple[int, ...], shift: tuple[int, int]) -> bool:
    """True when the overlap for ``shift`` keeps at least 2 pixels on each side."""
    return shape[-2] - abs(shift[0]) >= 2 and shape[-1] - abs(shift[1]) >= 2


@functools.lru_cache(maxsize=256)
def area_matrix(n: int, m: int) -> np.ndarray:
    """m x n box-filter resampling of n samples to m (cv2.INTER_AREA's weights when shrinking)."""
    edges = np.linspace(0.0, n, m + 1)
    left, right = np.arange(n)[None, :], np.arange(1, n + 1)[None, :]
    overlap = np.clip(
        np.minimum(right, edges[1:, None]) - np.maximum(left, edges[:-1, None]), 0, None
    )
    return overlap / overlap.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=256)
def linear_matrix(n: int, m: int) -> np.ndarray:
    """m x n linear interpolation of n samples to m (cv2.INTER_LINEAR's half-pixel centres)."""
    x = np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)
    low = np.floor(x).astype(int)
    high = np.minimum(low + 1, n - 1)
    out = np.zeros((m, n))
    np.add.at(out, (np.arange(m), low), 1 - (x - low))
    np.add.at(out, (np.arange(m), high), x - low)
    return out


@functools.lru_cache(maxsize=256)
def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n x n Gaussian blur of n samples with replicated borders (rows sum to 1)."""
    radius = int(np.ceil(4 * sigma))
    source = np.clip(np.arange(-radius, n + radius), 0, n - 1)
    taps = np.arange(n)[:, None] - np.arange(-radius, n + radius)[None, :]
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    out = np.zeros((n, n))
    for column, target in enumerate(source):
        out[:, target] += weights[:, column]
    return out / out.sum(axis=1, keepdims=True)


def resample(stack: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(P, h, w) arrays resampled to ``shape``: box filter along a side that shrinks, linear where it grows."""
    h, w = stack.shape[1:]

    def matrix(n: int, m: int) -> np.ndarray:
        return area_matrix(n, m) if m <= n else linear_matrix(n, m)

    return matrix(h, shape[0]) @ stack.astype(np.float64) @ matrix(w, shape[1]).T


@functools.lru_cache(maxsize=256)
def _hash_projection(n: int) -> np.ndarray:
    """8 x n matrix: box resampling of n samples to 8, blur, then the 8-point DCT-II.

    The blur is HASH_BLUR pixels of the n samples (HASH_BLUR * 8 / n on the
    8-sample grid), at least HASH_BLUR_MIN grid pixels.
    """
    k, x = np.arange(8)[:, None], np.arange(8)[None, :]
    dct = np.cos(np.pi * (2 * x + 1) * k / 16) * np.sqrt(2 / 8)
    dct[0] /= np.sqrt(2)
    sigma = max(HASH_BLUR_MIN, HASH_BLUR * 8 / max(n, 8))
    return dct @ blur_matrix(8, sigma) @ area_matrix(n, 8)


def thumbnail_hashes(thumbs: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """64-bit hashes (uint64) of (n, h, w) same-shape thumbnails, one array per crop in HASH_SHIFTS.

    Each is a pHash of the crop: the bits of its 8 x 8 low-frequency DCT above
    the median of the 63 non-DC coefficients plus PHASH_MARGIN of their spread
    (the margin keeps bits of near-zero coefficients, common on plain synthetic
    images, from flipping on noise), taken after resampling the crop to 8 x 8
    and blurring it (see _hash_projection). A shift too large for the
    thumbnail hashes the whole of it.
    """
    out = {}
    stack = thumbs.astype(np.float64)
    for shift in HASH_SHIFTS:
        part = crop(stack, shift) if usable_shift(stack.shape, shift) else stack
        rows, cols = _hash_projection(part.shape[1]), _hash_projection(part.shape[2])
        low = (rows @ part @ cols.T).reshape(len(stack), 64)
        rest = low[:, 1:]
        threshold = np.partition(rest, 31, axis=1)[:, 31] + PHASH_MARGIN * rest.std(axis=1)
        packed = np.packbits(low > threshold[:, None], axis=1)
        out[shift] = packed.view(">u8").ravel().astype(np.uint64)
    return out


def _blur(stack: np.ndarray, sigma: float) -> np.ndarray:
    """(P, h, w) arrays blurred along both sides (matrix products with replicated borders)."""
    _, h, w = stack.shape
    return np.matmul(blur_matrix(h, sigma), stack @ blur_matrix(w, sigma).T)


def _features(stack: np.ndarray, shift: tuple[int, int], gradients: bool) -> tuple:
    """Blurred overlap crops of (P, h, w) arrays: standardised (P, L), gradients, mean, spread.

    Each crop is blurred by PIXEL_BLUR, centred and scaled to a sum of squares
    of L (its number of pixels); a flat crop (spread 0) becomes zeros.
    Gradients (along w, along h) of the standardised crops, or None.
    """
    x = _blur(crop(stack, shift), PIXEL_BLUR)
    p, h, w = x.shape
    x = x.reshape(p, h * w)
    mean = x.mean(axis=1)
    x = x - mean[:, None]
    spread = np.sqrt(np.einsum("pl,pl->p", x, x) / (h * w))
    flat = spread < 1e-6
    x *= (1.0 / np.where(flat, 1.0, spread))[:, None]
    x[flat] = 0.0
    if not gradients:
        return x, None, None, mean, spread
    grid = x.reshape(p, h, w)
    gx, gy = np.gradient(grid, axis=2), np.gradient(grid, axis=1)
    return x, gx.reshape(p, -1), gy.reshape(p, -1), mean, spread


def thumbnail_correlations(
    stack: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    subpixel: np.ndarray,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Best correlation of thumbnails ``stack[i]`` and ``stack[j]`` (same shape) over 1-pixel offsets.

    For each offset s in HASH_SHIFTS (those ``allowed[k]`` permits for a pair,
    k the offset's index; all by default), crop s of i and crop -s of j
    (their overlap) are blurred by PIXEL_BLUR pixels and compared by
    Pearson's r; where ``subpixel`` is set, the difference of the
    standardised crops is first reduced by the best sub-pixel translation
    (least squares on the gradients of their mean), which raises r by what a
    fraction-of-a-pixel misalignment costs. Crops of different tone
    (brightness over TONE_MEAN apart, contrast ratio under TONE_CONTRAST) and
    flat crops correlate with nothing (0); a pair with no offset allowed gets
    -1. Each thumbnail's crop is prepared once per offset, however many pairs
    it is in.
    """
    stack = np.asarray(stack, dtype=np.float64)
    i, j, subpixel = np.asarray(i), np.asarray(j), np.asarray(subpixel, dtype=bool)
    best = np.full(len(i), -1.0)
    for k, shift in enumerate(HASH_SHIFTS):
        chosen = np.ones(len(i), dtype=bool) if allowed is None else allowed[k]
        if not usable_shift(stack.shape, shift):
            chosen = chosen & (shift == (0, 0))
        pairs = np.flatnonzero(chosen)
        if len(pairs) == 0:
            continue
        rows_a, ia = np.unique(i[pairs], return_inverse=True)
        rows_b, ib = np.unique(j[pairs], return_inverse=True)
        sub = subpixel[pairs]
        xa, gxa, gya, mean_a, spread_a = _features(stack[rows_a], shift, sub.any())
        opposite = (-shift[0], -shift[1])
        xb, gxb, gyb, mean_b, spread_b = _features(stack[rows_b], opposite, sub.any())
        size = xa.shape[1]
        xy = np.einsum("pl,pl->p", xa[ia], xb[ib])
        r = xy / size
        if sub.any():
            # Linearised alignment: the difference y - x against the gradients
            # of m = (x + y) / 2, each sum split into its per-pair products.
            a, b, sub = ia[sub], ib[sub], np.flatnonzero(sub)

            def dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
                return np.einsum("pl,pl->p", u, v)

            ga_x, ga_y, gb_x, gb_y = gxa[a], gya[a], gxb[b], gyb[b]
            xs, ys = xa[a], xb[b]
            gram = np.empty((len(sub), 2, 2))
            gram[:, 0, 0] = (dot(ga_x, ga_x) + 2 * dot(ga_x, gb_x) + dot(gb_x, gb_x)) / 4 + 1e-9
            gram[:, 1, 1] = (dot(ga_y, ga_y) + 2 * dot(ga_y, gb_y) + dot(gb_y, gb_y)) / 4 + 1e-9
            gram[:, 0, 1] = gram[:, 1, 0] = (
                dot(ga_x, ga_y) + dot(ga_x, gb_y) + dot(gb_x, ga_y) + dot(gb_x, gb_y)
            ) / 4
            rhs = np.stack(
                [
                    (dot(ga_x, ys) - dot(ga_x, xs) + dot(gb_x, ys) - dot(gb_x, xs)) / 2,
                    (dot(ga_y, ys) - dot(ga_y, xs) + dot(gb_y, ys) - dot(gb_y, xs)) / 2,
                ],
                axis=1,
            )
            explained = (rhs * np.linalg.solve(gram, rhs[..., None])[..., 0]).sum(axis=1)
            loss = np.maximum(2 * size - 2 * xy[sub] - explained, 0.0)
            r[sub] = 1.0 - loss / (2 * size)
        # Same tone: brightness within TONE_MEAN grey levels, contrast within
        # TONE_CONTRAST (a flat crop has none and matches nothing).
        low = np.minimum(spread_a[ia], spread_b[ib])
        high = np.maximum(spread_a[ia], spread_b[ib])
        same_tone = (np.abs(mean_a[ia] - mean_b[ib]) <= TONE_MEAN) & (low >= TONE_CONTRAST * high)
        r[~same_tone | (low < 1e-6)] = 0.0
        best[pairs] = np.maximum(best[pairs], r)
    return best
