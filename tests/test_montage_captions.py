"""Prediction montages: each cell captioned with its file name (shortened) and the top label."""

from __future__ import annotations

import os

import numpy as np
import pytest

from imgpipe.core import plots
from imgpipe.stages.predict import (
    CAPTION_NAME_WIDTH,
    _Montage,
    montage_caption,
    shorten_middle,
)


@pytest.mark.parametrize(
    ("text", "width", "expected"),
    [
        ("a.png", 18, "a.png"),
        ("exactly_18_chars.x", 18, "exactly_18_chars.x"),
        ("abcdefghijklmnopqrstuvwxyz", 10, "abcde\u2026wxyz"),
        ("holiday/IMG_20240612_183455.jpg", 18, "holiday/I\u20263455.jpg"),
        ("abc", 1, "\u2026"),
        ("abc", 2, "a\u2026"),
    ],
)
def test_shorten_middle_keeps_start_and_end(text, width, expected):
    assert shorten_middle(text, width) == expected


def test_shorten_middle_never_exceeds_the_width():
    for width in range(1, 30):
        for n in range(0, 40):
            text = "".join(chr(97 + i % 26) for i in range(n))
            short = shorten_middle(text, width)
            assert len(short) == min(n, width)
            if n > width:
                head = (width - 1 + 1) // 2
                assert short.startswith(text[:head]) and "\u2026" in short
    with pytest.raises(ValueError, match="width 0"):
        shorten_middle("abc", 0)


def test_caption_is_the_file_name_then_the_label_and_probability():
    long_name = "scans/2024/very_long_photo_name_0001.png"
    caption = montage_caption(long_name, "cat", 0.96123, "dog")
    name, line = caption.split("\n")
    assert name == shorten_middle(long_name) and len(name) == CAPTION_NAME_WIDTH
    assert name.endswith("0001.png")
    assert line == "cat 0.96 [dog]"  # the given label, where it differs
    assert montage_caption("a.png", "cat", 0.5, "cat") == "a.png\ncat 0.50"
    assert montage_caption("a.png", "cat", 0.5) == "a.png\ncat 0.50"
    # A name that is not UTF-8 (a POSIX file name is bytes) shows its odd byte.
    assert montage_caption(os.fsdecode(b"caf\xe9.png"), "7", 1.0) == "caf\\xe9.png\n7 1.00"


def test_montage_draws_every_caption(tmp_path, monkeypatch):
    drawn: list[str] = []
    save = plots.save_figure

    def keep_texts(fig, path, dpi=plots.DPI):
        drawn.extend(text.get_text() for ax in fig.axes for text in ax.texts)
        save(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", keep_texts)
    gallery = _Montage(per_row=2)
    captions = [
        montage_caption(f"folder/image_with_a_long_name_{i}.png", str(i), p)
        for i, p in enumerate([0.9, 0.4, 0.7])
    ]
    for caption, p in zip(captions, [0.9, 0.4, 0.7], strict=True):
        gallery.add(p, np.full((12, 12, 1), int(p * 255), np.uint8), caption)
    gallery.write(tmp_path / "montage.png")
    assert (tmp_path / "montage.png").stat().st_size > 0
    # Most confident row: 0.9, 0.7; least confident row: 0.4, 0.7.
    shown = [text for text in drawn if "\n" in text]
    assert sorted(shown) == sorted([captions[0], captions[2], captions[1], captions[2]])
    assert all(len(text.split("\n")[0]) <= CAPTION_NAME_WIDTH for text in shown)
