"""Loading the clean index and gathering its images from the shard arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from imgpipe.data.dataset import class_names, label_codes, load_images, load_index


def write_case(tmp_path, rgb: bool = False):
    """Two shard arrays whose every pixel encodes (shard, row), and an index over both."""
    channels = 3 if rgb else 1
    arrays = []
    for shard, n in enumerate((5, 4)):
        values = (shard * 100 + np.arange(n, dtype=np.uint8))[:, None, None, None]
        array = np.broadcast_to(values, (n, 6, 6, channels)).copy()
        path = tmp_path / f"shard-{shard}" / "images.npy"
        path.parent.mkdir()
        np.save(path, array)
        arrays.append(path)
    # Index order interleaves shards and runs rows backwards.
    picks = [(1, 3), (0, 4), (0, 0), (1, 0), (0, 2), (1, 1)]
    labels = ["10", "2", "cat", "2", "10", "cat"]
    index = pd.DataFrame(
        {
            "id": range(len(picks)),
            "path": [f"/d/{k}.png" for k in range(len(picks))],
            "relpath": [f"{k}.png" for k in range(len(picks))],
            "label": labels,
            "source": "train",
            "sha256": "0" * 64,
            "group": [0, 1, 1, 3, 4, 5],
            "near_group": [0, 1, 1, 3, 4, 5],
            "shard": [s for s, _ in picks],
            "row": [r for _, r in picks],
            "array": [str(arrays[s]) for s, _ in picks],
        }
    )
    index.to_csv(tmp_path / "index.csv", index=False)
    return tmp_path / "index.csv", picks


def test_load_images_gathers_rows_in_index_order(tmp_path):
    path, picks = write_case(tmp_path)
    images = load_images(load_index(path))
    assert images.dtype == np.uint8 and images.shape == (6, 6, 6, 1)
    assert images.flags["C_CONTIGUOUS"]
    assert images[:, 0, 0, 0].tolist() == [s * 100 + r for s, r in picks]


def test_load_images_keeps_colour_channels_and_works_on_a_subset(tmp_path):
    path, picks = write_case(tmp_path, rgb=True)
    index = load_index(path)
    subset = index.iloc[[4, 0]]
    images = load_images(subset)
    assert images.shape == (2, 6, 6, 3)
    assert images[:, 3, 3, 2].tolist() == [
        picks[4][0] * 100 + picks[4][1],
        picks[0][0] * 100 + picks[0][1],
    ]


def test_load_index_reads_labels_as_text_and_checks_columns(tmp_path):
    path, _ = write_case(tmp_path)
    index = load_index(path)
    assert index["label"].tolist() == ["10", "2", "cat", "2", "10", "cat"]
    assert index["group"].dtype == np.int64 and index["row"].dtype == np.int64
    index.drop(columns="array").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="missing column"):
        load_index(tmp_path / "bad.csv")


def test_class_names_are_sorted_labels_and_codes_index_them(tmp_path):
    path, _ = write_case(tmp_path)
    index = load_index(path)
    assert class_names(index) == ["10", "2", "cat"]
    assert label_codes(index).tolist() == [0, 1, 2, 1, 0, 2]


def test_empty_index_is_refused(tmp_path):
    path, _ = write_case(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        load_images(load_index(path).iloc[:0])
