"""Every kind of bad input, end to end: the whole DAG finishes, each refused file has its reason, the tree is untouched."""

from __future__ import annotations

import os
import struct
import zlib

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers.imagefactory import (
    make_tree,
    pattern,
    symlink,
    write_16bit_png,
    write_animated_gif,
    write_bomb_png,
    write_cmyk_jpeg,
    write_corrupt_png,
    write_exif_rotated_jpeg,
    write_multipage_tiff,
    write_palette_png,
    write_png,
    write_rgba_png,
    write_text_as_png,
    write_truncated,
    write_zero_byte,
)
from helpers.workflow_utils import (
    TINY_CONFIG,
    copy_workflow,
    deep_merge,
    digits_tree,
    snakemake,
    tree_digest,
    write_config,
)

from imgpipe.core.atomic import read_csv
from imgpipe.stages.demo import digits_images

AS_ROOT = os.geteuid() == 0
ODD_CLASS = "class é ü"


def zero_size_png(path):
    """A well-formed PNG whose header says 0 x 0 pixels."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def digit(label: int, n: int, size: int = 16) -> np.ndarray:
    """The n-th digit ``label`` beyond those digits_tree writes, upscaled, grey."""
    images, labels = digits_images()
    index = np.flatnonzero(labels == label)[40 + n]
    return cv2.resize(images[index], (size, size), interpolation=cv2.INTER_LINEAR)


# relpath -> (writer, the reason it is rejected with, or None when it is ingested)
BAD = {
    "0/corrupt.png": (write_corrupt_png, "unreadable"),
    "0/truncated.png": (write_truncated, "truncated"),
    "0/truncated.jpg": (lambda p: write_truncated(p, "jpeg"), "truncated"),
    "0/zero.png": (write_zero_byte, "zero_byte"),
    "0/text.png": (write_text_as_png, "not_image"),
    "0/notes.txt": (lambda p: p.write_text("notes"), "unsupported_extension"),
    "0/anim.gif": (lambda p: write_animated_gif(p, [pattern(16, 16)] * 2), "unsupported_extension"),
    "0/.hidden.png": (lambda p: p.write_bytes(b""), "hidden"),
    "0/loop.png": (symlink("loop.png"), "symlink_loop"),
    "0/dangling.png": (symlink("nowhere.png"), "broken_symlink"),
    "1/bomb.png": (write_bomb_png, "too_large"),
    "1/zero-size.png": (zero_size_png, "unreadable"),
    "1/sixteen.png": (
        lambda p: write_16bit_png(p, pattern(16, 16, 1).astype(np.uint16) * 257),
        None,
    ),
    "1/cmyk.jpg": (lambda p: write_cmyk_jpeg(p, pattern(16, 16, block=8)), None),
    "1/palette.png": (
        lambda p: write_palette_png(
            p,
            np.indices((16, 16)).sum(0) % 3,
            np.array([[0, 0, 0], [255, 255, 255], [90, 160, 30]]),
        ),
        None,
    ),
    "1/rgba.png": (lambda p: write_rgba_png(p, pattern(16, 16, 4)), None),
    "1/exif.jpg": (lambda p: write_exif_rotated_jpeg(p, 6), None),
    "1/pages.tif": (
        lambda p: write_multipage_tiff(p, [pattern(16, 16), pattern(16, 16)[::-1]]),
        None,
    ),
    "2/with space ñ.png": (lambda p: cv2.imwrite(str(p), digit(2, 0)) or p, None),
    "2/locked.png": (lambda p: cv2.imwrite(str(p), digit(2, 1)), None if AS_ROOT else "unreadable"),
    # Latin-1 file names (bytes that are not UTF-8), as os.fsdecode gives them.
    "2/caf\udce9.png": (lambda p: write_png(p, digit(2, 2)), None),
    "0/d\udce9fect.png": (write_corrupt_png, "unreadable"),
}


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("bad"))
    root = digits_tree(workdir / "data")
    for rel, (writer, _) in BAD.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
    (root / "2" / "locked.png").chmod(0)
    make_tree(
        root,
        {
            "1/tall.png": np.full((10000, 1), 128, np.uint8),
            "__MACOSX/0/._a.png": b"\x00\x05\x16\x07",
            "empty": None,
            "one/only.png": digit(3, 2),
            **{f"{ODD_CLASS}/{n}.png": digit(3, 3 + n) for n in range(4)},
        },
    )
    return workdir, root


@pytest.mark.slow
def test_bad_tree_runs_whole_dag_and_records_every_reason(bad_tree):
    workdir, root = bad_tree
    before = tree_digest(root)
    write_config(workdir, deep_merge(TINY_CONFIG, {"data": {"root": "data"}}))
    snakemake(workdir)
    assert (workdir / "results/report/index.html").is_file()
    assert tree_digest(root) == before, "the data tree changed"

    files = read_csv(workdir / "results/ingest/files.csv", keep_default_na=False)
    rejected = read_csv(workdir / "results/clean/rejected.csv", keep_default_na=False)
    index = read_csv(workdir / "results/clean/index.csv", keep_default_na=False)
    reasons = dict(zip(rejected["relpath"], rejected["reason"], strict=True))
    for rel, (_, reason) in BAD.items():
        if reason is None:
            assert rel not in reasons or reasons[rel] not in LISTING_AND_DECODING, (
                rel,
                reasons.get(rel),
            )
        else:
            assert reasons.get(rel) == reason, (rel, reasons.get(rel))
    assert reasons["1/tall.png"] in {"too_small", "odd_aspect"}
    assert reasons["__MACOSX"] == "hidden"
    assert reasons["one/only.png"] == "small_class"
    assert not (files["label"] == "empty").any()
    kept = set(index["relpath"])
    assert "2/with space ñ.png" in kept
    # A Latin-1 name is ingested, its path is the file's own bytes, the report shows it as \xNN.
    assert "2/caf\udce9.png" in kept
    assert os.fsencode(root / "2" / "caf\udce9.png") in {os.fsencode(p) for p in index["path"]}
    html = (workdir / "results/report/index.html").read_text(encoding="utf-8")
    assert "d\\xe9fect.png" in html
    assert {f"{ODD_CLASS}/{n}.png" for n in range(4)} <= kept
    assert set(index["label"]) >= {"0", "1", "2", "3", ODD_CLASS}
    assert len(rejected) == len(files) - len(index)


LISTING_AND_DECODING = {
    "hidden",
    "unsupported_extension",
    "missing_file",
    "outside_root",
    "duplicate_row",
    "broken_symlink",
    "symlink_loop",
    "unreadable",
    "zero_byte",
    "not_image",
    "truncated",
    "too_large",
}


@pytest.mark.slow
def test_manifest_with_missing_duplicate_and_outside_rows(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    root = digits_tree(workdir / "data", per_class=12, classes=3)
    write_corrupt_png(workdir / "outside.png")
    rows = [f"{p.relative_to(root)},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    rows += ["0/missing.png,0", rows[0], "../outside.png,0"]
    manifest = root / "manifest.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    before = tree_digest(root)
    write_config(workdir, deep_merge(TINY_CONFIG, {"data": {"root": "data/manifest.csv"}}))
    # A manifest only changes the listing: the split is the first stage past what it touches.
    snakemake(workdir, "results/split/split.csv")
    assert tree_digest(root) == before
    rejected = pd.read_csv(workdir / "results/clean/rejected.csv", keep_default_na=False)
    listed = rejected[rejected["reason"].isin(["missing_file", "duplicate_row", "outside_root"])]
    assert sorted(listed["reason"]) == ["duplicate_row", "missing_file", "outside_root"]
    reason_of = dict(zip(listed["reason"], listed["path"], strict=True))
    assert reason_of["missing_file"].endswith("missing.png")
    assert reason_of["outside_root"].endswith("outside.png")
    assert reason_of["duplicate_row"].endswith(rows[0].split(",")[0])


@pytest.mark.slow
def test_cv_k_larger_than_a_class(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    digits_tree(workdir / "data", per_class=10, classes=3)
    config = deep_merge(TINY_CONFIG, {"data": {"root": "data"}, "cv": {"k": 9}})
    write_config(workdir, config)
    proc = snakemake(workdir, "results/cv/folds.csv", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    message = [line for line in text.splitlines() if line.startswith("imgpipe: cv.k=9")]
    assert len(message) == 1, text[-3000:]
    assert "larger than the training images of class(es) " in message[0]
    assert "'0' (" in message[0], message[0]
    assert not (workdir / "results/cv/folds.csv").exists()


@pytest.mark.slow
def test_cv_adapt_k_finishes(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    digits_tree(workdir / "data", per_class=10, classes=3)
    # Without a sweep and with one epoch: the folds' number is what is tested, not their training.
    config = deep_merge(
        TINY_CONFIG,
        {
            "data": {"root": "data"},
            "cv": {"k": 9, "adapt_k": True},
            "sweep": {"enabled": False},
            "train": {"max_epochs": 1},
        },
    )
    write_config(workdir, config)
    snakemake(workdir, "results/cv/summary.csv")
    folds = pd.read_csv(workdir / "results/cv/folds.csv")
    used = folds["fold"].nunique()
    assert 2 <= used < 9
    summary = pd.read_csv(workdir / "results/cv/summary.csv")
    assert summary["fold"].astype(str).tolist() == [*map(str, range(used)), "mean", "std"]
