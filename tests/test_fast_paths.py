"""The loader's fast paths give what the plain paths give: uint8 augmentation, reads straight into the batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from imgpipe.data.dataset import NpyRows, ShardImages, channel_stats
from imgpipe.images.augment import affine_maps, augment_batch, warp_uint8
from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.image_datamodule import (
    ImageBatches,
    ImageDataModule,
    keep_freed_memory,
    to_uint8_nchw,
)

POLICIES = {
    "crop and flip": {"crop_area": [0.08, 1.0], "crop_ratio": [0.75, 4 / 3], "hflip": True},
    "zoom, rotation, shift, both flips": {
        "scale": [0.7, 1.3],
        "rotation": 40.0,
        "translate": 0.2,
        "hflip": True,
        "vflip": True,
    },
}


def smooth_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 NCHW pictures with soft edges (as photos are after resizing)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (n, channels, 5, 5)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 255).round().byte()


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize(("channels", "height", "width"), [(3, 40, 40), (1, 24, 36)])
def test_uint8_warp_samples_where_grid_sample_samples(name, channels, height, width):
    x8 = smooth_images(16, channels, 40)[:, :, :height, :width].contiguous()
    maps = affine_maps(16, POLICIES[name], torch.device("cpu"), torch.Generator().manual_seed(1))
    grid = F.affine_grid(maps, list(x8.shape), align_corners=False)
    reference = F.grid_sample(x8.float(), grid, mode="bilinear", align_corners=False)
    difference = (warp_uint8(x8, maps).float() - reference).abs()
    # Whole grey levels and 1/32 px positions: within a level or two, black outside alike.
    assert difference.mean() < 0.6 and torch.quantile(difference.flatten(), 0.999) <= 2.5


def test_uint8_warp_on_several_threads_equals_one_thread():
    x8 = smooth_images(7, 3, 40)
    maps = affine_maps(7, POLICIES["zoom, rotation, shift, both flips"], torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = warp_uint8(x8, maps)
        torch.set_num_threads(3)
        assert torch.equal(warp_uint8(x8, maps), alone)
    finally:
        torch.set_num_threads(threads)


def test_uint8_batch_gets_the_same_draws_and_views_as_a_float_batch():
    x8 = smooth_images(12, 3, 32)
    policy = {**POLICIES["zoom, rotation, shift, both flips"], "brightness": 0.3, "contrast": 0.3}
    from_float = augment_batch(x8.float() / 255, policy, torch.Generator().manual_seed(5))
    from_bytes = augment_batch(x8, policy, torch.Generator().manual_seed(5))
    assert from_bytes.dtype == torch.float32 and from_bytes.shape == from_float.shape
    assert (from_bytes - from_float).abs().mean() < 0.6 / 255
    assert from_bytes.min() >= 0 and from_bytes.max() <= 1


def test_uint8_batch_without_geometry_is_scaled_exactly():
    x8 = smooth_images(4, 3, 16)
    out = augment_batch(x8, {"hflip": False, "rotation": 0.0, "translate": 0.0})
    assert torch.equal(out, x8.float() / 255)


@pytest.mark.parametrize("size", [16, 64])  # grid_sample below UINT8_WARP_MIN_SIDE, OpenCV from it
def test_preprocess_normalises_uint8_batches_and_leaves_them_alone(size):
    module = ImageClassifier(
        {"name": "smallcnn", "channels": [4]},
        {"lr": 0.01},
        num_classes=2,
        in_channels=3,
        image_size=size,
        mean=[0.5, 0.4, 0.3],
        std=[0.2, 0.25, 0.3],
        augment_cfg={"on_device": True, "hflip": True, "rotation": 0.0, "translate": 0.0},
    )
    x8 = smooth_images(6, 3, size)
    before = x8.clone()
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    expected = (x8.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(module.preprocess(x8), expected)
    torch.manual_seed(0)
    flipped = module.preprocess(x8, augment=True)
    # Flips only: every image is itself or its mirror, exactly.
    for view, image in zip(flipped, expected, strict=True):
        same = torch.allclose(view, image, atol=1e-5)
        assert same or torch.allclose(view, image.flip(-1), atol=1e-5)
    assert torch.equal(x8, before)


def write_rows(path, n: int, shape=(5, 6, 3)) -> np.ndarray:
    """A .npy of n rows whose pixels all hold their row number."""
    values = np.arange(n, dtype=np.uint8)[:, None, None, None]
    array = np.broadcast_to(values, (n, *shape)).copy()
    np.save(path, array)
    return array


@pytest.mark.parametrize("rows", [[7, 3, 4, 5, 3, 0], [2, 3, 4], list(range(40, 0, -3))])
@pytest.mark.parametrize("big_rows", [False, True])
def test_rows_are_read_straight_into_their_slots(tmp_path, rows, big_rows, monkeypatch):
    if big_rows:  # no span read: a pread per run of consecutive rows and slots
        monkeypatch.setattr("imgpipe.data.dataset.SPAN_BYTES", 0)
        monkeypatch.setattr("imgpipe.data.dataset.SPAN_FACTOR", 0)
    array = write_rows(tmp_path / "a.npy", 50)
    reader = NpyRows(tmp_path / "a.npy")
    out = np.full((len(rows) + 3, 5, 6, 3), 255, np.uint8)
    slots = np.arange(len(rows)) * 2 % len(out) if len(rows) < 4 else np.arange(len(rows)) + 3
    reader.read_into(np.array(rows), out, slots=slots)
    assert np.array_equal(out[slots], array[rows])
    untouched = np.setdiff1d(np.arange(len(out)), slots)
    assert np.all(out[untouched] == 255)
    assert np.array_equal(reader[rows], array[rows])


def test_batches_mix_shards_and_augmented_views_in_order(tmp_path):
    first, second = write_rows(tmp_path / "s0.npy", 10), write_rows(tmp_path / "s1.npy", 8)
    views = write_rows(tmp_path / "views.npy", 6) + 100
    np.save(tmp_path / "views.npy", views)
    index = pd.DataFrame(
        {
            "array": [str(tmp_path / "s0.npy")] * 3 + [str(tmp_path / "s1.npy")] * 3,
            "row": [9, 0, 4, 7, 1, 2],
        }
    )
    images = ShardImages(index)
    expected = np.concatenate([first[[9, 0, 4]], second[[7, 1, 2]]])
    assert np.array_equal(images[np.arange(6)], expected)
    batches = ImageBatches(
        images,
        np.array([5, 0, 3]),
        np.array([0, 1, 0]),
        NpyRows(tmp_path / "views.npy"),
        np.array([4, 1]),
        np.array([1, 1]),
    )
    x, y = batches[torch.tensor([3, 0, 4, 2, 1, 0])]
    want = np.stack([views[4], expected[5], views[1], expected[3], expected[0], expected[5]])
    assert x.dtype == torch.uint8 and x.is_contiguous()
    assert torch.equal(x, torch.from_numpy(want).permute(0, 3, 1, 2))
    assert y.tolist() == [1, 0, 1, 0, 1, 0]


def test_batches_cross_as_pinned_uint8_when_asked(tmp_path):
    write_rows(tmp_path / "s0.npy", 10)
    images = ShardImages(pd.DataFrame({"array": [str(tmp_path / "s0.npy")] * 10, "row": range(10)}))
    labels = np.arange(10) % 2
    data = ImageDataModule(images, labels, np.arange(8), [8, 9], batch_size=4, pin_memory=True)
    assert data.train_dataloader().pin_memory and data.val_dataloader().pin_memory
    default = ImageDataModule(images, labels, np.arange(8), [8, 9], batch_size=4)
    x, _ = next(iter(default.train_dataloader()))  # no trainer: the CPU, not pinned
    assert not default.train_dataloader().pin_memory
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 5, 6)


def test_freed_memory_is_kept_for_reuse_on_glibc():
    assert keep_freed_memory() in (True, False)  # never raises, even off glibc
    assert keep_freed_memory() == keep_freed_memory()  # set once per process


def test_channel_stats_are_the_exact_mean_and_std_of_the_pixels(monkeypatch):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (50, 12, 10, 3), dtype=np.uint8)
    images[:, :, :, 2] //= 4  # channels of different statistics
    monkeypatch.setattr("imgpipe.data.dataset.STATS_CHUNK_BYTES", 1000)  # a few images per chunk
    ids = np.arange(3, 50, 2)
    mean, std = channel_stats(images, ids)
    pixels = images[ids].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-12)
    flat = np.full((4, 5, 5, 1), 7, np.uint8)
    assert channel_stats(flat) == ([7 / 255], [1e-3])  # std floored


def classifier(channels: int, size: int, augment_cfg: dict) -> ImageClassifier:
    rng = np.random.default_rng(channels)
    return ImageClassifier(
        {"name": "smallcnn", "channels": [4]},
        {"lr": 0.01},
        num_classes=2,
        in_channels=channels,
        image_size=size,
        mean=rng.uniform(0.2, 0.6, channels).tolist(),
        std=rng.uniform(0.1, 0.4, channels).tolist(),
        augment_cfg=augment_cfg,
    )


@pytest.mark.parametrize(("channels", "size"), [(1, 16), (3, 40)])
def test_table_lookup_gives_the_float_paths_bits(channels, size):
    module = classifier(channels, size, {"on_device": True}).eval()
    rows = np.random.default_rng(3).integers(0, 256, (5, size, size, channels), dtype=np.uint8)
    x8 = to_uint8_nchw(rows)  # as the loaders make them (one channel: NHWC strides)
    float_path = (x8.float().div_(255.0) - module.mean) / module.std
    looked_up = module.preprocess(x8)
    assert torch.equal(looked_up, float_path)
    # The same strides too: convolutions pick their kernels by layout.
    assert looked_up.stride() == float_path.stride()
    with torch.no_grad():
        assert torch.equal(module(looked_up), module(float_path))
    assert module.by_table(x8.float(), False) is None  # floats take the float path


def test_a_warp_only_policy_is_warped_and_looked_up_in_one_pass():
    policy = {"on_device": True, **POLICIES["zoom, rotation, shift, both flips"]}
    module = classifier(3, 40, policy)
    x8 = smooth_images(6, 3, 40)
    torch.manual_seed(4)
    fused = module.preprocess(x8, augment=True)
    torch.manual_seed(4)  # the same draws, warped and normalised in two steps
    maps = affine_maps(6, policy, torch.device("cpu"))
    two_steps = (warp_uint8(x8, maps).float().div_(255.0) - module.mean) / module.std
    assert torch.equal(fused, two_steps)
    # Colour jitter, or images below UINT8_WARP_MIN_SIDE, take the float path.
    assert classifier(3, 40, {**policy, "brightness": 0.2}).by_table(x8, True) is None
    assert module.by_table(x8[:, :, :16, :16].contiguous(), True) is None
    assert module.by_table(x8, False) is not None
