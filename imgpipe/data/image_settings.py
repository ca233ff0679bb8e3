"""image.size and image.mode as ingest uses them: the configured values, or inferred from the data.

``image.size: auto`` becomes the median short side of the listed images,
clamped to [MIN_SIZE, MAX_SIZE] (8 px digits -> 16, 96 px thumbnails -> 96,
photos -> 224). ``image.mode: auto`` becomes ``rgb`` when any sampled image
has colour, else ``gray``. Explicit values in the config win.

What is read, and how much:

* a bounded, evenly spaced sample of at most SAMPLE_FILES of the listing's ok
  files (sorted by source and path, so the sample spans every class);
* of each, its header only (``imgpipe.images.decode.read_file_header``: the first
  64 KiB of a PNG or JPEG, the whole file for other formats): width, height
  and channels, no pixel is decoded for the size;
* colour: a header's channel count says grey (1 channel, or grey + alpha) for
  certain, but a 3-channel file may hold a grey picture (scans and exports
  saved as RGB JPEG / PNG are common). Files whose header says colour are
  therefore decoded (JPEG at a reduced scale by libjpeg, which costs a
  fraction of a full decode), at most COLOUR_DECODES of them, evenly spaced,
  stopping at the first with colour. An image has colour when more than
  COLOUR_SHARE of its pixels have channels further apart than COLOUR_SPREAD
  grey levels: a grey picture stored as RGB, JPEG chroma rounding included,
  stays within a few levels.

The result is ``results/ingest/image.json``: ``{size, mode, fit, configured,
inferred, from_files, ...}``, read by every ingest shard (a changed result
re-ingests) and written into ``results/config.yaml`` by config_snapshot.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from imgpipe.images.decode import MODES, Truncated, decode_image, read_bytes, read_file_header

log = logging.getLogger("imgpipe")

AUTO = "auto"
MIN_SIZE, MAX_SIZE = 16, 224
# Files whose headers are read (evenly spaced over the listing's ok files).
SAMPLE_FILES = 2000
# Files with colour channels decoded to see whether their channels differ.
COLOUR_DECODES = 200
COLOUR_SPREAD = 16  # grey levels between a pixel's largest and smallest channel
COLOUR_SHARE = 0.005  # share of pixels above that spread for an image to count as colour
# A JPEG is decoded at 1/2, 1/4 or 1/8 scale while its short side stays at least this.
COLOUR_CHECK_SIDE = 64


@dataclass(frozen=True)
class FileFacts:
    """What the sample learnt about one file: its sides and header channels (None: unreadable)."""

    path: str
    width: int
    height: int
    channels: int
    format: str


def sample_positions(n: int, limit: int | None = None) -> np.ndarray:
    """At most ``limit`` (default SAMPLE_FILES) evenly spaced positions of 0..n-1 (all when n <= limit)."""
    limit = SAMPLE_FILES if limit is None else limit
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def header_facts(path: str) -> FileFacts | None:
    """Sides and channels from a file's header, or None when it cannot be read (ingest says why)."""
    try:
        header = read_file_header(path)
    except (OSError, Truncated, ValueError):
        return None
    if header is None or header.width <= 0 or header.height <= 0:
        return None
    return FileFacts(path, header.width, header.height, header.channels, header.format)


def may_have_colour(facts: FileFacts) -> bool:
    """Whether a header allows colour: 3 or more channels (colour, palette, colour + alpha)."""
    return facts.channels >= 3


def _jpeg_reduction(short_side: int) -> int:
    """The libjpeg decode flag that shrinks the most while keeping COLOUR_CHECK_SIDE px."""
    for factor, flag in (
        (8, cv2.IMREAD_REDUCED_COLOR_8),
        (4, cv2.IMREAD_REDUCED_COLOR_4),
        (2, cv2.IMREAD_REDUCED_COLOR_2),
    ):
        if short_side // factor >= COLOUR_CHECK_SIDE:
            return flag
    return cv2.IMREAD_COLOR


def decoded_rgb(facts: FileFacts) -> np.ndarray | None:
    """The file's pixels as HxWx3 (any channel order), alpha composited; None when undecodable."""
    try:
        data = read_bytes(facts.path)
    except OSError:
        return None
    if facts.format == "jpeg":
        flag = _jpeg_reduction(min(facts.width, facts.height))
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        except cv2.error:
            image = None
        if image is not None and image.ndim == 3 and image.shape[2] == 3:
            return image
    decoded = decode_image(data, "rgb")
    return decoded.image


def has_colour(image: np.ndarray) -> bool:
    """Whether more than COLOUR_SHARE of an HxWx3 image's pixels have channels COLOUR_SPREAD apart."""
    if image.ndim != 3 or image.shape[2] < 3:
        return False
    spread = image[:, :, :3].max(axis=2).astype(np.int16) - image[:, :, :3].min(axis=2)
    return bool((spread > COLOUR_SPREAD).mean() > COLOUR_SHARE)


def colour_evidence(candidates: Sequence[FileFacts]) -> tuple[str | None, int]:
    """(first file found with colour or None, files decoded): up to COLOUR_DECODES, evenly spaced."""
    picks = sample_positions(len(candidates), COLOUR_DECODES)
    for checked, position in enumerate(picks, start=1):
        image = decoded_rgb(candidates[position])
        if image is not None and has_colour(image):
            return candidates[position].path, checked
    return None, len(picks)


def infer_settings(paths: Sequence[str], check_colour: bool = True) -> dict[str, Any]:
    """Size and mode inferred from the headers (and a colour check) of a sample of ``paths``.

    Returns ``size`` (median short side clamped to [MIN_SIZE, MAX_SIZE]),
    ``mode`` (``rgb`` when a sampled image has colour, ``gray`` otherwise; None
    without ``check_colour``) and the evidence: ``from_files`` (headers read),
    ``median_short_side``, ``short_side_range``, ``colour_channels`` (files whose
    header has 3+ channels), ``colour_decoded``, ``colour_example``.
    """
    picks = sample_positions(len(paths))
    facts = [f for f in (header_facts(paths[k]) for k in picks) if f is not None]
    shorts = np.array([min(f.width, f.height) for f in facts], dtype=np.float64)
    median = float(np.median(shorts)) if len(shorts) else float(MIN_SIZE)
    size = int(np.clip(round(median), MIN_SIZE, MAX_SIZE))
    candidates = [f for f in facts if may_have_colour(f)]
    example, decoded = (None, 0)
    if check_colour and candidates:
        example, decoded = colour_evidence(candidates)
    mode = ("rgb" if example else "gray") if check_colour else None
    return {
        "size": size,
        "mode": mode,
        "sampled_files": len(picks),
        "from_files": len(facts),
        "median_short_side": median if len(shorts) else None,
        "short_side_range": [int(shorts.min()), int(shorts.max())] if len(shorts) else None,
        "colour_channels": len(candidates),
        "colour_decoded": decoded,
        "colour_example": example,
    }


def resolve_settings(image_cfg: Mapping, paths: Sequence[str]) -> dict[str, Any]:
    """The image settings ingest uses: explicit config values, ``auto`` ones inferred from ``paths``.

    ``image_cfg`` is the image section with its defaults filled in (imgpipe.workflow.settings).
    """
    size_cfg, mode_cfg = image_cfg["size"], image_cfg["mode"]
    if mode_cfg != AUTO and mode_cfg not in MODES:
        raise ValueError(f"image.mode {mode_cfg!r}: expected auto or one of {sorted(MODES)}")
    inferred = infer_settings(paths, check_colour=mode_cfg == AUTO)
    size = inferred["size"] if size_cfg == AUTO else int(size_cfg)
    mode = inferred["mode"] if mode_cfg == AUTO else mode_cfg
    return {
        "size": size,
        "mode": mode,
        "fit": image_cfg["fit"],
        "configured": {"size": size_cfg, "mode": mode_cfg},
        "inferred": inferred,
        "reasons": {
            "size": size_reason(inferred) if size_cfg == AUTO else "configured",
            "mode": mode_reason(inferred) if mode_cfg == AUTO else "configured",
        },
        "from_files": inferred["from_files"],
        "listed_files": len(paths),
        "limits": {
            "size": [MIN_SIZE, MAX_SIZE],
            "sample_files": SAMPLE_FILES,
            "colour_decodes": COLOUR_DECODES,
        },
    }


def load_settings(path: str | os.PathLike) -> dict[str, Any]:
    """Read image.json back (size, mode, fit and the evidence)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def size_reason(inferred: Mapping[str, Any]) -> str:
    """Why the inferred size is what it is, in a few words."""
    median = inferred["median_short_side"]
    if median is None:
        return "no readable image header"
    clamped = "" if MIN_SIZE <= median <= MAX_SIZE else f", clamped to [{MIN_SIZE}, {MAX_SIZE}]"
    return f"median short side {median:g} px of {inferred['from_files']} files{clamped}"


def mode_reason(inferred: Mapping[str, Any]) -> str:
    """Why the inferred mode is what it is, in a few words."""
    if inferred["colour_example"]:
        return f"colour in {inferred['colour_example']}"
    if not inferred["colour_channels"]:
        return f"the headers of all {inferred['from_files']} sampled files say grey"
    return (
        f"no colour in {inferred['colour_decoded']} decoded of the "
        f"{inferred['colour_channels']} sampled files with colour channels"
    )


def describe(settings: Mapping[str, Any]) -> str:
    """One line saying what size and mode ingest uses and where each came from."""
    parts = []
    for key in ("size", "mode"):
        configured = settings["configured"][key]
        arrow = f"auto -> {settings[key]}" if configured == AUTO else str(settings[key])
        parts.append(f"image.{key} {arrow} ({settings['reasons'][key]})")
    return "; ".join(parts)
