"""Ingesting shards: partition, pass-through, measurements, atomic outputs, raw files untouched."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import imagefactory as factory
from hypothesis import given
from hypothesis import strategies as st

from imgpipe.data import ingest
from imgpipe.data.ingest import (
    STATS_COLUMNS,
    index_shard,
    load_stats,
    prepare_images,
    shard_positions,
)
from imgpipe.data.listing import list_images
from imgpipe.images import measure as imagestats
from imgpipe.images.decode import decode_image, fit_square

EXTS = [".png", ".jpg", ".bmp", ".tif", ".gif", ".webp"]
GRAY16 = {"size": 16, "mode": "gray", "fit": "pad"}


def run_shard(files, tmp_path, shard=0, shards=1, image_cfg=GRAY16, max_pixels=10**8):
    out = tmp_path / f"out-{shard}"
    stats = index_shard(
        files, shard, shards, image_cfg, max_pixels, out / "stats.csv", out / "images.npy"
    )
    return stats, np.load(out / "images.npy"), out


def mixed_tree(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    return factory.make_tree(
        root,
        {
            "cat/a.png": factory.pattern(8, 8),
            "cat/wide.png": factory.pattern(10, 40),
            "cat/deep/b.jpg": factory.pattern(32, 48, block=16),
            "cat/c.bmp": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8),
            "dog with space/é.png": factory.pattern(64, 64),
            "dog with space/z.png": factory.write_zero_byte,
            "dog with space/corrupt.png": factory.write_corrupt_png,
            "dog with space/t.png": factory.write_text_as_png,
            "dog with space/tr.jpg": lambda p: factory.write_truncated(p, "jpeg"),
            "dog with space/bomb.png": factory.write_bomb_png,
            "dog with space/.hidden.png": factory.pattern(8, 8),
            "bird/anim.gif": lambda p: factory.write_animated_gif(
                p, [factory.pattern(12, 12), np.zeros((12, 12, 3), np.uint8)]
            ),
            "bird/rot.jpg": lambda p: factory.write_exif_rotated_jpeg(p, 6),
            "bird/notes.txt": "not listed",
        },
    )


@given(n=st.integers(0, 60), shards=st.integers(1, 9))
def test_shard_positions_cover_every_row_once(n, shards):
    parts = [shard_positions(n, s, shards) for s in range(shards)]
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(n))
    for s, part in enumerate(parts):
        assert (part % shards == s).all()


@pytest.mark.parametrize(
    "batch_files, batch_bytes", [(1, 2**30), (3, 2**30), (128, 500), (128, 2**26)]
)
def test_shards_partition_real_listing_and_rows_point_at_images(
    tmp_path, monkeypatch, batch_files, batch_bytes
):
    monkeypatch.setattr(ingest, "BATCH_FILES", batch_files)
    monkeypatch.setattr(ingest, "BATCH_BYTES", batch_bytes)
    mixed_tree(tmp_path / "data")
    files = list_images(tmp_path / "data", EXTS)
    seen = []
    for shard in range(3):
        stats, images, _ = run_shard(files, tmp_path, shard, 3)
        assert list(stats.columns) == STATS_COLUMNS
        assert images.shape == (len(stats), 16, 16, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(stats["row"], np.arange(len(stats)))
        expected_paths = files["path"].iloc[shard::3].tolist()
        assert stats["path"].tolist() == expected_paths
        for row in stats.itertuples():
            if row.status == "ok":
                decoded = decode_image(Path(row.path).read_bytes(), "gray")
                np.testing.assert_array_equal(images[row.row], fit_square(decoded.image, 16, "pad"))
                # The batched path records what the one-file path measures.
                fields, _ = next(
                    prepare_images([row.path], {"size": 16, "mode": "gray", "fit": "pad"}, 10**8)
                )
                recorded = stats.loc[row.Index, STATS_COLUMNS[5:]].tolist()
                assert recorded == list(fields)
            else:
                assert not images[row.row].any()
        seen += stats["path"].tolist()
    assert sorted(seen) == sorted(files["path"])


def test_reasons_and_pass_through(tmp_path, monkeypatch):
    mixed_tree(tmp_path / "data")
    files = list_images(tmp_path / "data", EXTS)
    opened = []
    real_decode_file = ingest.decode_file

    def spy(path, *args):
        opened.append(path)
        return real_decode_file(path, *args)

    monkeypatch.setattr(ingest, "decode_file", spy)
    stats, _, _ = run_shard(files, tmp_path)
    by_rel = {row.relpath: row for row in stats.itertuples()}
    assert {rel: row.reason for rel, row in by_rel.items() if row.reason} == {
        "dog with space/z.png": "zero_byte",
        "dog with space/corrupt.png": "unreadable",
        "dog with space/t.png": "not_image",
        "dog with space/tr.jpg": "truncated",
        "dog with space/bomb.png": "too_large",
        "dog with space/.hidden.png": "hidden",
        "bird/notes.txt": "unsupported_extension",
    }
    listing_rejected = set(files.loc[files["status"] == "rejected", "path"])
    assert listing_rejected and not listing_rejected & set(opened)
    assert by_rel["bird/anim.gif"].detail == "first of 2 frames"
    assert (by_rel["bird/rot.jpg"].width, by_rel["bird/rot.jpg"].height) == (40, 24)
    assert (by_rel["dog with space/bomb.png"].width, by_rel["dog with space/bomb.png"].bytes) > (
        49999,
        0,
    )


def test_measurements_are_taken_at_full_resolution(tmp_path):
    image = factory.pattern(64, 96)
    factory.make_tree(tmp_path / "d", {"c/big.png": image})
    stats, _, out = run_shard(list_images(tmp_path / "d", EXTS), tmp_path, image_cfg=GRAY16)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    expected = imagestats.gray_stats(gray)
    for name, value in expected.items():
        assert stats[name].iloc[0] == pytest.approx(value)
    back = load_stats(out / "stats.csv")
    assert (back["width"].iloc[0], back["height"].iloc[0]) == (96, 64)
    # The near-duplicate signature: a 16 x 16 box-filtered thumbnail, as text.
    assert back["thumb"].iloc[0].startswith("16x16:")
    thumb = imagestats.parse_thumbnail(back["thumb"].iloc[0])
    np.testing.assert_array_equal(thumb, imagestats.thumbnail(gray))
    np.testing.assert_array_equal(thumb, cv2.resize(gray, (16, 16), interpolation=cv2.INTER_AREA))


def test_thumbnails_keep_small_images_at_their_own_size():
    rng = np.random.default_rng(0)
    for h, w in [(8, 8), (7, 9), (12, 40), (300, 20), (1000, 1000)]:
        gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
        thumb = imagestats.thumbnail(gray)
        assert thumb.shape == (min(h, 16), min(w, 16)) and thumb.dtype == np.uint8
        if h <= 16 and w <= 16:
            np.testing.assert_array_equal(thumb, gray)
        text = imagestats.format_thumbnail(thumb)
        assert text.startswith(f"{thumb.shape[1]}x{thumb.shape[0]}:")
        np.testing.assert_array_equal(imagestats.parse_thumbnail(text), thumb)


def test_pixel_hash_same_pixels_different_files(tmp_path):
    image = factory.pattern(12, 12)
    factory.make_tree(
        tmp_path / "d",
        {"a/x.png": image, "a/x.bmp": image, "b/y.tif": image, "a/other.png": image[::-1]},
    )
    stats, _, _ = run_shard(
        list_images(tmp_path / "d", EXTS), tmp_path, image_cfg={**GRAY16, "mode": "rgb"}
    )
    h = dict(zip(stats["relpath"], stats["pixel_hash"], strict=True))
    s = dict(zip(stats["relpath"], stats["sha256"], strict=True))
    assert h["a/x.png"] == h["a/x.bmp"] == h["b/y.tif"] != h["a/other.png"]
    assert len({s["a/x.png"], s["a/x.bmp"], s["b/y.tif"]}) == 3
    for row in stats.itertuples():
        assert row.sha256 == hashlib.sha256(Path(row.path).read_bytes()).hexdigest()
        assert row.bytes == os.path.getsize(row.path)


def test_rgb_and_crop(tmp_path):
    image = factory.pattern(20, 60)
    factory.make_tree(tmp_path / "d", {"c/a.png": image})
    files = list_images(tmp_path / "d", EXTS)
    _, images, _ = run_shard(files, tmp_path, image_cfg={"size": 20, "mode": "rgb", "fit": "crop"})
    assert images.shape == (1, 20, 20, 3)
    np.testing.assert_array_equal(images[0], image[:, 20:40])


def test_raw_files_unchanged(tmp_path):
    paths = mixed_tree(tmp_path / "data")
    before = {
        p: (hashlib.sha256(p.read_bytes()).digest(), p.stat().st_mtime_ns)
        for p in paths.values()
        if p.is_file()
    }
    listing = sorted(os.listdir(tmp_path / "data" / "cat"))
    files = list_images(tmp_path / "data", EXTS)
    for shard in range(2):
        run_shard(files, tmp_path, shard, 2)
    after = {p: (hashlib.sha256(p.read_bytes()).digest(), p.stat().st_mtime_ns) for p in before}
    assert after == before
    assert sorted(os.listdir(tmp_path / "data" / "cat")) == listing


def test_empty_shard(tmp_path):
    factory.make_tree(tmp_path / "d", {"c/a.png": factory.pattern(8, 8)})
    files = list_images(tmp_path / "d", EXTS)
    stats, images, _ = run_shard(files, tmp_path, shard=3, shards=4)
    assert stats.empty and list(stats.columns) == STATS_COLUMNS
    assert images.shape == (0, 16, 16, 1)


def test_failure_leaves_no_output_and_no_temp_files(tmp_path, monkeypatch):
    factory.make_tree(tmp_path / "d", {f"c/{i}.png": factory.pattern(8, 8) for i in range(5)})
    files = list_images(tmp_path / "d", EXTS)
    calls = []

    def dies_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args)

    real = ingest.decode_file
    monkeypatch.setattr(ingest, "decode_file", dies_on_third)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        index_shard(files, 0, 1, GRAY16, 10**8, out / "stats.csv", out / "images.npy")
    assert os.listdir(out) == []


def test_progress_is_logged(tmp_path, caplog, monkeypatch):
    factory.make_tree(tmp_path / "d", {f"c/{i}.png": factory.pattern(8, 8) for i in range(40)})
    files = list_images(tmp_path / "d", EXTS)
    with caplog.at_level(logging.INFO, logger="imgpipe"):
        run_shard(files, tmp_path / "quick")
    # A quick shard: the closing line only (lines come at most every few seconds).
    lines = [r.getMessage() for r in caplog.records if "files/s" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("shard 0: 40/40 files in ")
    caplog.clear()
    monkeypatch.setattr("imgpipe.core.logs.PROGRESS_SECONDS", 0.0)  # a line at every file
    with caplog.at_level(logging.INFO, logger="imgpipe"):
        run_shard(files, tmp_path / "slow")
    lines = [r.getMessage() for r in caplog.records if "files/s" in r.getMessage()]
    assert len(lines) == 40
    assert lines[0].startswith("shard 0: 1/40 files (2%)") and lines[0].endswith(" left")
    assert lines[-1].startswith("shard 0: 40/40 files in ")


def test_memory_does_not_grow_with_images(tmp_path):
    """The array lives in the memory-mapped file: Python-side peak stays flat."""
    rng = np.random.default_rng(0)
    factory.make_tree(
        tmp_path / "d",
        {f"c/{i:03d}.png": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(300)},
    )
    files = list_images(tmp_path / "d", EXTS)
    cfg = {"size": 128, "mode": "rgb", "fit": "pad"}  # 48 KiB per output image
    peaks = []
    for count in (30, 300):
        tracemalloc.start()
        index_shard(
            files.iloc[:count],
            0,
            1,
            cfg,
            10**8,
            tmp_path / f"s{count}.csv",
            tmp_path / f"i{count}.npy",
        )
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # Holding the 270 extra outputs in memory would add ~13 MB.
    assert peaks[1] - peaks[0] < 3_000_000


@pytest.mark.slow
def test_snakemake_rules_on_a_tree(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    mixed_tree(tmp_path / "data")
    config = tmp_path / "config.yaml"
    text = (repo / "config" / "config.yaml").read_text(encoding="utf-8")
    config.write_text(text.replace("root: demo", f"root: {tmp_path / 'data'}"), encoding="utf-8")
    snakemake = Path(sys.executable).with_name("snakemake")
    targets = [
        f"results/ingest/shard-{i}/{name}" for i in (0, 1) for name in ("stats.csv", "images.npy")
    ]
    run = subprocess.run(
        [
            str(snakemake),
            "-s",
            str(repo / "Snakefile"),
            "--directory",
            str(tmp_path / "wd"),
            "--configfile",
            str(config),
            "--cores",
            "2",
            *targets,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "libpng" not in run.stderr  # codec noise goes to the job's log
    wd = tmp_path / "wd"
    files = pd.read_csv(wd / "results/ingest/files.csv", dtype=str, keep_default_na=False)
    stats = pd.concat([load_stats(wd / f"results/ingest/shard-{i}/stats.csv") for i in (0, 1)])
    assert sorted(stats["path"]) == sorted(files["path"])
    assert "truncated" in set(stats["reason"])
    logs = "".join((wd / f"logs/ingest/shard-{i}.log").read_text(encoding="utf-8") for i in (0, 1))
    assert "shard 0" in logs and "libpng error" in logs
    shutil.rmtree(wd / ".snakemake", ignore_errors=True)


def test_ingest_listing_writes_what_the_shard_jobs_write(tmp_path):
    """The benchmarks' ingest (ingest.ingest_listing, fresh processes) is the workflow's, shard by shard."""
    mixed_tree(tmp_path / "data")
    files = list_images(tmp_path / "data", EXTS)
    files.to_csv(tmp_path / "files.csv", index=False)
    stats_paths = ingest.ingest_listing(tmp_path / "files.csv", GRAY16, 10**8, tmp_path / "all", 2)
    assert stats_paths == [f"{tmp_path / 'all'}/shard-{s}/stats.csv" for s in range(2)]
    for shard in range(2):
        _, images, out = run_shard(files, tmp_path, shard, 2)
        pd.testing.assert_frame_equal(load_stats(stats_paths[shard]), load_stats(out / "stats.csv"))
        np.testing.assert_array_equal(
            np.load(tmp_path / "all" / f"shard-{shard}" / "images.npy"), images
        )
