"""image.size: auto and image.mode: auto: inferred from the headers (and a colour check) of a sample.

Documented values (config/config.yaml, imgpipe/data/image_settings.py): the median
short side clamped to [16, 224]; rgb when any sampled image has colour.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from helpers.imagefactory import write_image, write_jpeg, write_png, write_rgba_png
from helpers.workflow_utils import (
    REPO,
    TINY_CONFIG,
    copy_workflow,
    deep_merge,
    planned_jobs,
    snakemake,
    write_config,
)
from test_report import render_caption

from imgpipe.data import image_settings
from imgpipe.data.image_settings import has_colour, resolve_settings
from imgpipe.images.decode import HEADER_BYTES, read_file_header
from imgpipe.stages.config_snapshot import write_config_snapshot
from imgpipe.workflow.config import config_errors, load_schema

SCHEMA = load_schema(REPO / "config" / "schema.yaml")


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour picture (RGB uint8) with some grain: photo-like."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 6, image.shape)
    return np.clip(image + grain, 0, 255).astype(np.uint8)


def grey_as_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A grey picture stored with three equal channels (a scan saved as RGB)."""
    grey = photo(rng, height, width)[:, :, 0]
    return np.repeat(grey[:, :, None], 3, axis=2)


def tree(root: Path, images: dict[str, np.ndarray], writer=write_png) -> list[str]:
    """Write ``{relpath: array}`` under ``root``; return the paths in listing order."""
    paths = [str(writer(root / rel, array)) for rel, array in sorted(images.items())]
    return paths


AUTO = {"size": "auto", "mode": "auto", "fit": "pad"}


def test_thumbnail_tree_of_8px_grey_digits_gets_16_px_gray(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        f"{c}/{k}.png": rng.integers(0, 256, (8, 8), dtype=np.uint8) for c in "ab" for k in range(5)
    }
    settings = resolve_settings(AUTO, tree(tmp_path, images))
    assert (settings["size"], settings["mode"]) == (16, "gray")
    assert settings["inferred"]["median_short_side"] == 8
    assert settings["inferred"]["colour_decoded"] == 0  # grey headers: nothing decoded
    assert settings["from_files"] == 10


def test_colour_thumbnail_tree_keeps_its_median_short_side_and_rgb(tmp_path):
    rng = np.random.default_rng(1)
    sides = [(40, 30), (48, 36), (96, 96), (30, 60), (64, 48)]  # short sides 30 36 96 30 48
    images = {f"c{k % 2}/{k}.png": photo(rng, h, w) for k, (h, w) in enumerate(sides)}
    settings = resolve_settings(AUTO, tree(tmp_path, images))
    assert (settings["size"], settings["mode"]) == (36, "rgb")
    assert settings["inferred"]["short_side_range"] == [30, 96]
    assert settings["inferred"]["colour_decoded"] == 1  # the first colour image settles it


def test_photo_tree_is_clamped_to_224_px_rgb(tmp_path):
    rng = np.random.default_rng(2)
    sides = [(480, 640), (600, 400), (1024, 768), (300, 300)]
    images = {f"c{k % 2}/{k}.jpg": photo(rng, h, w) for k, (h, w) in enumerate(sides)}
    settings = resolve_settings(AUTO, tree(tmp_path, images, write_jpeg))
    assert (settings["size"], settings["mode"]) == (224, "rgb")
    assert settings["inferred"]["median_short_side"] == 440  # of 300, 400, 480, 768
    assert "clamped to [16, 224]" in settings["reasons"]["size"]


def test_grey_pictures_stored_as_rgb_are_gray_and_one_colour_image_makes_rgb(tmp_path):
    rng = np.random.default_rng(3)
    grey = {f"g/{k}.jpg": grey_as_rgb(rng, 120, 160) for k in range(6)}
    paths = tree(tmp_path, grey, write_jpeg)
    assert all(read_file_header(p).channels == 3 for p in paths)  # the headers say colour
    settings = resolve_settings(AUTO, paths)
    assert (settings["size"], settings["mode"]) == (120, "gray")
    assert settings["inferred"]["colour_decoded"] == 6
    colour = str(write_jpeg(tmp_path / "c" / "x.jpg", photo(rng, 120, 160)))
    settings = resolve_settings(AUTO, [*paths, colour])
    assert settings["mode"] == "rgb" and settings["inferred"]["colour_example"] == colour


def test_alpha_is_composited_before_the_colour_check(tmp_path):
    # Fully transparent pixels may carry any colour: they must not count.
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255  # red, but invisible
    rgba[8:24, 8:24] = [90, 90, 90, 255]
    path = write_rgba_png(tmp_path / "a" / "x.png", rgba)
    assert resolve_settings(AUTO, [str(path)])["mode"] == "gray"


def test_colour_needs_channels_apart_on_more_than_a_few_pixels():
    image = np.full((100, 100, 3), 128, np.uint8)
    image[:, :, 2] += 3  # JPEG-style rounding between channels: still grey
    assert not has_colour(image)
    image[:3, :10] = [255, 0, 0]  # 30 of 10,000 pixels (0.3%): still grey
    assert not has_colour(image)
    image[:10, :10] = [255, 0, 0]  # 1%: colour
    assert has_colour(image)


def test_explicit_values_win_and_skip_the_colour_decode(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    paths = tree(tmp_path, {f"c/{k}.png": photo(rng, 50, 50) for k in range(3)})
    monkeypatch.setattr(image_settings, "decoded_rgb", lambda facts: pytest.fail("decoded"))
    settings = resolve_settings({"size": 64, "mode": "gray", "fit": "crop"}, paths)
    assert (settings["size"], settings["mode"], settings["fit"]) == (64, "gray", "crop")
    assert settings["inferred"]["size"] == 50 and settings["inferred"]["mode"] is None
    assert settings["reasons"] == {"size": "configured", "mode": "configured"}


def test_the_sample_is_bounded_and_evenly_spaced(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    # Sides grow with the position: an evenly spaced sample keeps the median.
    paths = [
        str(write_png(tmp_path / f"c/{k:02d}.png", photo(rng, 20 + k, 20 + k))) for k in range(41)
    ]
    monkeypatch.setattr(image_settings, "SAMPLE_FILES", 5)
    settings = resolve_settings(AUTO, paths)
    assert settings["inferred"]["sampled_files"] == settings["from_files"] == 5
    assert settings["listed_files"] == 41
    assert settings["size"] == 40  # positions 0, 10, 20, 30, 40: median side 20 + 20


def test_unreadable_files_are_left_to_ingest(tmp_path):
    good = write_png(tmp_path / "a" / "ok.png", np.zeros((20, 30), np.uint8) + 100)
    (tmp_path / "a" / "bad.png").write_bytes(b"not an image at all")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    paths = [str(tmp_path / "a" / n) for n in ("bad.png", "empty.png")] + [str(good)]
    settings = resolve_settings(AUTO, [*paths, str(tmp_path / "gone.png")])
    assert settings["from_files"] == 1 and settings["size"] == 20


def test_header_of_a_jpeg_with_a_long_exif_block_is_still_found(tmp_path):
    rng = np.random.default_rng(6)
    path = write_image(tmp_path / "x.jpg", photo(rng, 70, 90))
    data = path.read_bytes()
    # An APP2 segment after SOI, and enough of them to push the frame header past the prefix.
    filler = b"".join(b"\xff\xe2" + (65535).to_bytes(2, "big") + bytes(65533) for _ in range(2))
    path.write_bytes(data[:2] + filler + data[2:])
    assert path.stat().st_size > 2 * HEADER_BYTES
    header = read_file_header(path)
    assert (header.width, header.height, header.channels) == (90, 70, 3)


def test_schema_takes_auto_or_a_number():
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert base["image"]["size"] == "auto" and base["image"]["mode"] == "auto"
    for size, ok in (("auto", True), (96, True), (3, False), ("big", False), (16.0, False)):
        config = deep_merge(base, {"image": {"size": size}})
        assert (not config_errors(config, SCHEMA)) == ok, size
    for mode, ok in (("auto", True), ("rgb", True), ("gray", True), ("cmyk", False)):
        config = deep_merge(base, {"image": {"mode": mode}})
        assert (not config_errors(config, SCHEMA)) == ok, mode


def test_config_snapshot_holds_the_inferred_values_with_a_comment(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    image = {
        "size": 16,
        "mode": "gray",
        "fit": "pad",
        "reasons": {"size": "median short side 8 px", "mode": "the headers say grey"},
    }
    path = tmp_path / "config.yaml"
    write_config_snapshot(config, path, ["config/config.yaml"], image)
    text = path.read_text()
    assert yaml.safe_load(text)["image"] == {"size": 16, "mode": "gray", "fit": "pad"}
    assert "  size: 16  # auto: inferred from the data (median short side 8 px)" in text
    assert "# image.size and image.mode: auto in the config, inferred" in text
    config["image"]["mode"] = "rgb"  # explicit: no comment
    image["mode"] = "rgb"
    write_config_snapshot(config, path, [], image)
    assert "mode: rgb\n" in path.read_text() and "# image.size: auto" in path.read_text()


def test_report_caption_shows_the_resolved_size():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    folder = REPO / "workflow" / "report"
    before = render_caption(folder / "workflow.rst", config)
    assert "inferred from the data" in before and "auto" not in before
    config["image_resolved"] = {"size": 96, "mode": "rgb", "fit": "pad"}
    after = render_caption(folder / "workflow.rst", config)
    assert "96x96" in after and "rgb arrays (inferred from the data)" in after
    assert "96 pixels" in render_caption(folder / "rejected_examples.rst", config)


@pytest.mark.slow
def test_workflow_resolves_auto_into_image_json_and_ingests_at_that_size(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    rng = np.random.default_rng(7)
    for c in ("cat", "dog"):
        for k in range(6):
            write_jpeg(workdir / "data" / c / f"{k}.jpg", photo(rng, 40 + 4 * k, 60))
    config = deep_merge(TINY_CONFIG, {"data": {"root": "data"}, "image": {"size": "auto"}})
    write_config(workdir, config)
    snakemake(workdir, "results/ingest/shard-0/images.npy", "results/config.yaml")
    settings = json.loads((workdir / "results" / "ingest" / "image.json").read_text())
    # Short sides 40..60 (12 files): median 50; the photos have colour.
    assert (settings["size"], settings["mode"], settings["from_files"]) == (50, "rgb", 12)
    assert np.load(workdir / "results/ingest/shard-0/images.npy").shape[1:] == (50, 50, 3)
    snapshot = (workdir / "results" / "config.yaml").read_text()
    assert "size: 50  # auto: inferred from the data" in snapshot
    assert "mode: rgb  # auto" in snapshot
    log = (workdir / "logs" / "ingest" / "image_settings.log").read_text()
    assert "image.size auto -> 50" in log
    # Nothing reruns: the params hold the config as given, not the resolved values.
    targets = ("results/ingest/shard-0/images.npy", "results/config.yaml")
    dry = snakemake(workdir, "-n", *targets)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # An explicit size resolves anew, and ingest (which reads image.json) follows.
    write_config(workdir, {"image": {"size": 32}})
    planned = planned_jobs(workdir, *targets)
    assert planned == Counter({"image_settings": 1, "ingest_shard": 1, "config_snapshot": 1})
