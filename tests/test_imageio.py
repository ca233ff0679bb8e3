"""Decoding real files: odd-but-valid ones convert correctly, broken ones get the right reason."""

from __future__ import annotations

import io
import struct
import time

import cv2
import numpy as np
import pytest
from helpers import imagefactory as factory
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from imgpipe.data.ingest import decode_file as read_file
from imgpipe.images import decode as imageio
from imgpipe.images.decode import decode_image, fit_square


def decode_file(path, mode="rgb", max_pixels=100_000_000):
    return decode_image(path.read_bytes(), mode, max_pixels)


def mean_abs(a, b):
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_comes_out_upright(tmp_path, fmt, orientation):
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    upright = factory.write_exif_rotated_jpeg(path, orientation, fmt=fmt)
    result = decode_file(path)
    assert result.ok, result.detail
    assert result.image.shape == upright.shape
    assert (result.width, result.height) == (upright.shape[1], upright.shape[0])
    tolerance = 6 if fmt == "JPEG" else 0
    assert mean_abs(result.image, upright) <= tolerance
    # Same answer as PIL's reference implementation of the EXIF transforms.
    reference = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert mean_abs(result.image, reference) <= tolerance


def test_orientation_6_is_not_left_as_stored(tmp_path):
    path = tmp_path / "rotated.jpg"
    upright = factory.write_exif_rotated_jpeg(path, 6)
    stored = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.shape[:2] == upright.shape[1::-1]  # the file really holds it rotated
    result = decode_file(path)
    assert result.image.shape[:2] == upright.shape[:2]
    assert "orientation 6" in result.detail


@settings(max_examples=40, deadline=None)
@given(
    orientation=st.integers(1, 8),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_apply_orientation_matches_pil(orientation, height, width, seed):
    stored = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.fromarray(stored)
    image.info["exif"] = exif.tobytes()
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    np.testing.assert_array_equal(imageio.apply_orientation(stored, orientation), expected)


@pytest.mark.parametrize("order", ["<", ">"])
def test_exif_orientation_parser_reads_both_byte_orders(order):
    mark = b"II" if order == "<" else b"MM"
    entry = struct.pack(order + "HHI", 0x0112, 3, 1) + struct.pack(order + "H", 8) + b"\0\0"
    tiff = mark + struct.pack(order + "HI", 42, 8) + struct.pack(order + "H", 1) + entry
    assert imageio.exif_orientation(tiff + b"\0\0\0\0") == 8
    assert imageio.exif_orientation(b"garbage") == 1


# ------------------------------------------------------------- colour & depth


def test_16bit_png_is_shifted_not_clipped(tmp_path):
    high = np.arange(256, dtype=np.uint16).reshape(16, 16)
    values = (high << 8) | 0xAB  # low byte must not matter
    result = decode_file(factory.write_16bit_png(tmp_path / "g16.png", values), "gray")
    assert result.ok and result.bit_depth == 16
    np.testing.assert_array_equal(result.image[:, :, 0], high.astype(np.uint8))


def test_16bit_rgb_png_and_tiff(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    for path in (
        factory.write_16bit_png(tmp_path / "c16.png", rgb),
        factory.write_16bit_tiff(tmp_path / "c16.tif", rgb),
    ):
        result = decode_file(path, "rgb")
        assert result.ok and result.bit_depth == 16
        np.testing.assert_array_equal(result.image, (rgb >> 8).astype(np.uint8))


def test_palette_png_colours(tmp_path):
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    indices = np.arange(30).reshape(5, 6) % 4
    result = decode_file(factory.write_palette_png(tmp_path / "p.png", indices, palette))
    assert result.ok
    np.testing.assert_array_equal(result.image, palette[indices])


def test_palette_transparency_becomes_white(tmp_path):
    palette = np.array([[255, 0, 0], [0, 255, 0], [7, 7, 7]], np.uint8)
    indices = np.arange(12).reshape(3, 4) % 3
    path = factory.write_palette_png(tmp_path / "pt.png", indices, palette, transparent_index=2)
    expected = palette[indices].copy()
    expected[indices == 2] = 255
    np.testing.assert_array_equal(decode_file(path).image, expected)


def test_rgba_composited_on_white(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (6, 6, 4)).astype(np.uint8)
    rgba[:2, :, 3] = 0  # transparent pixels with random colour underneath
    rgba[2:4, :, 3] = 255
    rgba[4:, :, 3] = 128
    result = decode_file(factory.write_rgba_png(tmp_path / "a.png", rgba))
    assert result.ok and result.channels == 4
    assert (result.image[:2] == 255).all()
    np.testing.assert_array_equal(result.image[2:4], rgba[2:4, :, :3])
    blended = (rgba[4:, :, :3] * 128.0 + 255 * 127.0) / 255
    assert np.abs(result.image[4:] - blended).max() <= 1


def test_gray_alpha_png(tmp_path):
    gray = np.full((4, 4), 100, np.uint8)
    alpha = np.tile(np.array([0, 255], np.uint8), (4, 2))
    result = decode_file(factory.write_gray_alpha_png(tmp_path / "la.png", gray, alpha), "gray")
    assert result.channels == 2
    np.testing.assert_array_equal(result.image[:, :, 0], np.where(alpha == 0, 255, 100))


def test_cmyk_jpeg_close_to_rgb_original(tmp_path):
    rgb = factory.pattern(32, 48, block=16)
    result = decode_file(factory.write_cmyk_jpeg(tmp_path / "c.jpg", rgb))
    assert result.ok and result.channels == 4
    assert mean_abs(result.image, rgb) < 4


def test_gray_file_in_rgb_mode_and_rgb_file_in_gray_mode(tmp_path):
    gray = factory.pattern(8, 12, channels=1)
    result = decode_file(factory.write_png(tmp_path / "g.png", gray), "rgb")
    assert result.channels == 1 and result.image.shape == (8, 12, 3)
    for c in range(3):
        np.testing.assert_array_equal(result.image[:, :, c], gray)
    rgb = factory.pattern(8, 12)
    as_gray = decode_file(factory.write_png(tmp_path / "c.png", rgb), "gray")
    assert as_gray.image.shape == (8, 12, 1) and as_gray.image.dtype == np.uint8
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)  # ITU-R BT.601 luma, as PIL's "L"
    np.testing.assert_array_equal(as_gray.image[:, :, 0], expected)


def test_channel_order_is_rgb(tmp_path):
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    for name in ("r.png", "r.bmp", "r.webp", "r.tiff"):
        path = factory.write_image(tmp_path / name, red)
        np.testing.assert_array_equal(decode_file(path).image[0, 0], [255, 0, 0])


def test_grayscale_jpeg_reports_one_channel(tmp_path):
    path = factory.write_jpeg(tmp_path / "g.jpg", factory.pattern(16, 16, channels=1))
    result = decode_file(path, "gray")
    assert result.ok and result.channels == 1 and result.image.shape == (16, 16, 1)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [np.full((8, 8, 3), v, np.uint8) for v in (10, 200, 90)]
    result = decode_file(factory.write_animated_gif(tmp_path / "a.gif", frames))
    assert result.ok and "first of 3 frames" in result.detail
    assert (result.image == 10).all()


def test_multipage_tiff_gives_first_page(tmp_path):
    pages = [factory.pattern(8, 8), np.zeros((8, 8, 3), np.uint8)]
    result = decode_file(factory.write_multipage_tiff(tmp_path / "m.tif", pages))
    assert result.ok and "first of 2 frames" in result.detail
    np.testing.assert_array_equal(result.image, pages[0])


def test_format_is_sniffed_not_taken_from_extension(tmp_path):
    image = factory.pattern(32, 32, block=16)
    path = factory.write_jpeg(tmp_path / "really_a_jpeg.png", image)
    result = decode_file(path)
    assert result.ok and mean_abs(result.image, image) < 8


# ----------------------------------------------------------------- rejections


def test_zero_byte(tmp_path):
    result = decode_file(factory.write_zero_byte(tmp_path / "z.png"))
    assert (result.status, result.reason, result.image) == ("rejected", "zero_byte", None)


def test_text_named_png_is_not_an_image(tmp_path):
    assert decode_file(factory.write_text_as_png(tmp_path / "t.png")).reason == "not_image"


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("keep", [0.02, 0.3, 0.7, 0.99])
def test_truncated_png_and_jpeg(tmp_path, fmt, keep):
    result = decode_file(factory.write_truncated(tmp_path / f"t.{fmt}", fmt, keep))
    assert (result.status, result.reason) == ("rejected", "truncated")


def test_jpeg_missing_only_its_end_marker_is_truncated(tmp_path):
    path = factory.write_jpeg(tmp_path / "a.jpg", factory.pattern(32, 32))
    path.write_bytes(path.read_bytes()[:-2])
    assert decode_file(path).reason == "truncated"


def test_exif_thumbnail_end_marker_does_not_hide_truncation(tmp_path):
    # The EXIF thumbnail holds its own FF D9 before the main scan data.
    thumb = io.BytesIO()
    Image.fromarray(factory.pattern(8, 8)).save(thumb, "JPEG")
    main = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 1
    app1 = b"Exif\x00\x00" + exif.tobytes() + thumb.getvalue()
    Image.fromarray(factory.pattern(64, 64)).save(main, "JPEG")
    data = main.getvalue()
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    full = data[:2] + segment + data[2:]
    path = tmp_path / "thumb.jpg"
    path.write_bytes(full)
    assert decode_file(path).ok
    path.write_bytes(full[: len(full) * 3 // 4])
    assert decode_file(path).reason == "truncated"


@pytest.mark.parametrize("ext", [".bmp", ".webp", ".tif", ".gif"])
def test_other_formats_truncated(tmp_path, ext):
    image = factory.pattern(48, 48)
    path = tmp_path / f"x{ext}"
    if ext == ".gif":
        factory.write_animated_gif(path, [image, image[::-1]])
    else:
        factory.write_image(path, image)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    assert decode_file(path).reason == "truncated"


def test_corrupt_png_data_is_unreadable(tmp_path):
    result = decode_file(factory.write_corrupt_png(tmp_path / "c.png"))
    assert (result.status, result.reason) == ("rejected", "unreadable")


def test_bomb_refused_from_header_without_decoding(tmp_path, monkeypatch):
    path = factory.write_bomb_png(tmp_path / "bomb.png", 50000, 50000)
    assert path.stat().st_size < 2000

    def no_decoding(*args, **kwargs):
        raise AssertionError("the decoder must not run on a decompression bomb")

    monkeypatch.setattr(imageio.cv2, "imdecode", no_decoding)
    start = time.perf_counter()
    result = decode_file(path)
    assert time.perf_counter() - start < 0.5
    assert (result.reason, result.width, result.height) == ("too_large", 50000, 50000)


@pytest.mark.parametrize("ext", [".jpg", ".webp", ".bmp", ".tif", ".gif"])
def test_max_pixels_applies_to_every_format(tmp_path, ext):
    path = factory.write_image(tmp_path / f"a{ext}", factory.pattern(20, 30))
    assert decode_file(path, max_pixels=20 * 30).ok
    result = decode_file(path, max_pixels=20 * 30 - 1)
    assert (result.reason, result.width, result.height) == ("too_large", 30, 20)


def test_os_errors_are_unreadable(tmp_path):
    for path in (tmp_path / "missing.png", tmp_path):
        fields, image = read_file(str(path), "rgb", 10**8)
        assert fields[6:8] == ("rejected", "unreadable") and image is None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        decode_image(b"x", "cmyk")


# --------------------------------------------------------------------- resize


def test_fit_pad_letterboxes_with_border_median():
    image = np.full((10, 40, 3), 200, np.uint8)
    image[3:7, 10:30] = [255, 0, 0]
    out = fit_square(image, 8, "pad")
    assert out.shape == (8, 8, 3)
    # 40x10 -> 8x2 centred in rows 3..4, the rest is the border colour.
    assert (out[:3] == 200).all() and (out[5:] == 200).all()
    assert out[3:5, 2:6, 1].mean() < 200  # the red block survives the shrink


def test_fit_crop_takes_the_centre():
    image = np.zeros((10, 30, 1), np.uint8)
    image[:, 10:20] = 255
    out = fit_square(image, 10, "crop")
    assert out.shape == (10, 10, 1) and (out == 255).all()


def test_fit_interpolation_area_when_shrinking_linear_when_enlarging():
    checker = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)[:, :, None]
    small = fit_square(checker, 8, "pad")
    assert np.abs(small.astype(int) - 128).max() <= 1  # area averaging, no aliasing
    ramp = np.array([[0, 255]], np.uint8).repeat(2, axis=0)[:, :, None]
    large = fit_square(ramp, 8, "pad")[:, :, 0]
    assert len(np.unique(large[4])) > 2  # linear ramp, not nearest blocks


def test_fit_same_size_keeps_pixels_and_single_channel_axis():
    image = np.random.default_rng(0).integers(0, 256, (12, 12, 1), dtype=np.uint8)
    np.testing.assert_array_equal(fit_square(image, 12, "pad"), image)
    assert fit_square(image[:5], 12, "pad").shape == (12, 12, 1)
    assert fit_square(image[:, :1], 12, "crop").shape == (12, 12, 1)


def test_format_only_pil_knows_is_decoded_through_pil(tmp_path):
    # OpenCV has no ICO decoder; the PIL fallback keeps such files usable.
    image = factory.pattern(16, 16)
    path = tmp_path / "icon.ico"
    Image.fromarray(image).save(path, "ICO", sizes=[(16, 16)])
    result = decode_file(path)
    assert result.ok and "decoded by PIL" in result.detail
    np.testing.assert_array_equal(result.image, image)
