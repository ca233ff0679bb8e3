"""Write real image files, odd and broken ones included, for tests.

Every ``write_*`` function takes the destination path first, creates parent
folders, writes the file and returns its ``Path``. Arrays are in RGB(A)
channel order (not OpenCV's BGR) and uint8 unless a function says otherwise.

    from helpers.imagefactory import make_tree, pattern, write_png  # tests/ is on sys.path under pytest
    tree = make_tree(tmp_path / "data", {"cat/a.png": pattern(8, 8), "dog/b.jpg": pattern(16, 8)})
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# PIL's transpose that undoes EXIF orientation o (as ImageOps.exif_transpose).
UPRIGHT_METHOD = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# The inverse: what to store so that a viewer applying orientation o shows the upright image.
STORED_METHOD = {**UPRIGHT_METHOD, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _prepare(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def pattern(height: int, width: int, channels: int = 3, block: int = 1) -> np.ndarray:
    """An asymmetric uint8 test image: every flip or rotation of it differs from it.

    Four quadrants of distinct colours plus a gradient; ``block`` repeats each
    pixel into block x block squares (JPEG-friendly when block is 8).
    """
    h, w = -(-height // block), -(-width // block)
    yy, xx = np.mgrid[0:h, 0:w]
    red = np.where(xx < w / 2, 230, 30) + 0 * yy
    green = np.where(yy < h / 2, 200, 50) + 0 * xx
    blue = (40 + 170 * (xx + 2 * yy) / max(1, w + 2 * h - 3)).astype(int)
    rgb = np.stack([red, green, blue], axis=-1).astype(np.uint8)
    rgb = np.repeat(np.repeat(rgb, block, axis=0), block, axis=1)[:height, :width]
    if channels == 1:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if channels == 4:
        alpha = np.full((height, width, 1), 255, np.uint8)
        return np.concatenate([rgb, alpha], axis=-1)
    return rgb


def _to_bgr(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2 or array.shape[2] == 1:
        return array
    code = cv2.COLOR_RGBA2BGRA if array.shape[2] == 4 else cv2.COLOR_RGB2BGR
    return cv2.cvtColor(array, code)


def write_image(path: str | os.PathLike, array: np.ndarray, **params: int) -> Path:
    """Write an RGB(A) or grey array with OpenCV, format from the extension (.png, .jpg, ...)."""
    path = _prepare(path)
    flags = [int(x) for item in params.items() for x in item]
    ok, buf = cv2.imencode(path.suffix.lower(), _to_bgr(np.asarray(array)), flags)
    if not ok:
        raise OSError(f"OpenCV could not encode {path.suffix}")
    path.write_bytes(buf.tobytes())
    return path


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a PNG (grey, RGB or RGBA; uint8 or uint16) whatever the path's extension."""
    path = _prepare(path)
    ok, buf = cv2.imencode(".png", _to_bgr(np.asarray(array)))
    if not ok:
        raise OSError("OpenCV could not encode PNG")
    path.write_bytes(buf.tobytes())
    return path


def write_jpeg(path: str | os.PathLike, array: np.ndarray, quality: int = 95) -> Path:
    """Write a baseline JPEG of a grey or RGB array."""
    path = _prepare(path)
    ok, buf = cv2.imencode(".jpg", _to_bgr(np.asarray(array)), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError("OpenCV could not encode JPEG")
    path.write_bytes(buf.tobytes())
    return path


def _pil_save(path: str | os.PathLike, image: Image.Image, fmt: str, **kwargs: object) -> Path:
    path = _prepare(path)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    path.write_bytes(buf.getvalue())
    return path


def write_cmyk_jpeg(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> Path:
    """Write an RGB array as a 4-component CMYK JPEG (as print workflows produce)."""
    image = Image.fromarray(np.asarray(rgb, np.uint8), "RGB").convert("CMYK")
    return _pil_save(path, image, "JPEG", quality=quality)


def write_16bit_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint16 grey (HxW) or RGB (HxWx3) array as a 16-bit PNG."""
    return write_png(path, np.asarray(array, np.uint16))


def write_16bit_tiff(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint16 grey or RGB array as a 16-bit TIFF."""
    path = _prepare(path)
    ok, buf = cv2.imencode(".tiff", _to_bgr(np.asarray(array, np.uint16)))
    if not ok:
        raise OSError("OpenCV could not encode TIFF")
    path.write_bytes(buf.tobytes())
    return path


def write_palette_png(
    path: str | os.PathLike,
    indices: np.ndarray,
    palette: np.ndarray,
    transparent_index: int | None = None,
) -> Path:
    """Write a palette (indexed) PNG: ``indices`` HxW into ``palette`` Kx3 RGB colours.

    With ``transparent_index`` that palette entry is fully transparent (tRNS chunk).
    """
    image = Image.fromarray(np.asarray(indices, np.uint8), "P")
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(palette)] = palette
    image.putpalette(flat.ravel().tolist())
    kwargs = {} if transparent_index is None else {"transparency": transparent_index}
    return _pil_save(path, image, "PNG", **kwargs)


def write_rgba_png(path: str | os.PathLike, rgba: np.ndarray) -> Path:
    """Write an RGBA uint8 array as a PNG with alpha."""
    return _pil_save(path, Image.fromarray(np.asarray(rgba, np.uint8), "RGBA"), "PNG")


def write_gray_alpha_png(path: str | os.PathLike, gray: np.ndarray, alpha: np.ndarray) -> Path:
    """Write a grey+alpha (LA) PNG."""
    la = np.stack([np.asarray(gray, np.uint8), np.asarray(alpha, np.uint8)], axis=-1)
    return _pil_save(path, Image.fromarray(la, "LA"), "PNG")


def stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels to store so that EXIF ``orientation`` displays ``upright``."""
    if orientation == 1:
        return upright
    image = Image.fromarray(upright).transpose(STORED_METHOD[orientation])
    return np.asarray(image)


def write_exif_rotated_jpeg(
    path: str | os.PathLike,
    orientation: int,
    upright: np.ndarray | None = None,
    fmt: str = "JPEG",
) -> np.ndarray:
    """Write an image whose pixels are stored rotated/flipped with EXIF ``orientation`` set.

    A correct reader shows ``upright`` (default: ``pattern(24, 40, block=8)``),
    which is returned. ``fmt`` may also be PNG, WEBP or TIFF.
    """
    upright = pattern(24, 40, block=8) if upright is None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(stored_for_orientation(upright, orientation))
    kwargs: dict = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        kwargs["quality"] = 95
    if fmt == "WEBP":
        kwargs["lossless"] = True
    if fmt == "TIFF":
        # TIFF keeps orientation as a tag of its own IFD, not an EXIF blob.
        kwargs = {"tiffinfo": {0x0112: orientation}}
    _pil_save(path, stored, fmt, **kwargs)
    return upright


def write_truncated(path: str | os.PathLike, fmt: str = "png", keep: float = 0.6) -> Path:
    """Write a valid PNG or JPEG (64x64 pattern with texture) and cut it to ``keep`` of its bytes."""
    rng = np.random.default_rng(0)
    array = np.clip(pattern(64, 64).astype(int) + rng.integers(-20, 20, (64, 64, 3)), 0, 255)
    ext = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg"}[fmt]
    ok, buf = cv2.imencode(ext, _to_bgr(array.astype(np.uint8)))
    if not ok:
        raise OSError(f"OpenCV could not encode {ext}")
    data = buf.tobytes()
    path = _prepare(path)
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def write_corrupt_png(path: str | os.PathLike) -> Path:
    """Write a complete PNG (IEND present) whose compressed pixel data is damaged."""
    path = write_png(path, pattern(32, 32))
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 10  # past the chunk type and the zlib header
    data[start : start + 30] = b"\x00" * 30
    path.write_bytes(bytes(data))
    return path


def write_zero_byte(path: str | os.PathLike) -> Path:
    """Write an empty file."""
    path = _prepare(path)
    path.write_bytes(b"")
    return path


def write_text_as_png(path: str | os.PathLike, text: str = "this is not an image\n") -> Path:
    """Write a text file (typically under an image extension)."""
    path = _prepare(path)
    path.write_text(text * 4, encoding="utf-8")
    return path


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def write_bomb_png(path: str | os.PathLike, width: int = 50000, height: int = 50000) -> Path:
    """Write a tiny, well-formed PNG whose header claims ``width`` x ``height`` grey pixels.

    The IDAT holds a few compressed zero rows only: decoding it would try to
    allocate the full image (a decompression bomb) and then fail.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
    data += _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")
    path = _prepare(path)
    path.write_bytes(data)
    return path


def write_animated_gif(path: str | os.PathLike, frames: list[np.ndarray]) -> Path:
    """Write RGB frames as an animated GIF (first frame first)."""
    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    return _pil_save(path, images[0], "GIF", save_all=True, append_images=images[1:])


def write_multipage_tiff(path: str | os.PathLike, pages: list[np.ndarray]) -> Path:
    """Write RGB or grey pages as one multi-page TIFF."""
    images = [Image.fromarray(np.asarray(p, np.uint8)) for p in pages]
    return _pil_save(path, images[0], "TIFF", save_all=True, append_images=images[1:])


def symlink(target: str | os.PathLike) -> Callable[[Path], Path]:
    """A make_tree value: a symbolic link to ``target`` (may dangle or form a loop)."""

    def create(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
        return path

    return create


def make_tree(root: str | os.PathLike, spec: Mapping[str, object]) -> dict[str, Path]:
    """Create files under ``root`` from ``{relative path: content}``; return their paths.

    Content: a numpy array (written with OpenCV in the format of the path's
    extension, RGB order), ``bytes`` (written raw), ``str`` (written as UTF-8
    text), a callable taking the path (e.g. ``symlink(target)`` or
    ``lambda p: write_cmyk_jpeg(p, img)``), or ``None`` for an empty folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for rel, content in spec.items():
        path = root / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        elif isinstance(content, np.ndarray):
            write_image(path, content)
        elif isinstance(content, bytes):
            _prepare(path).write_bytes(content)
        elif isinstance(content, str):
            _prepare(path).write_text(content, encoding="utf-8")
        elif callable(content):
            content(path)
        else:
            raise TypeError(f"make_tree: unsupported content for {rel!r}: {type(content)}")
        paths[rel] = path
    return paths
