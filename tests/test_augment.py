import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.model_selection import StratifiedGroupKFold

from imgpipe.data.split import POOL_ROLES, assign_roles, role_ids
from imgpipe.images.augment import (
    augment_batch,
    augment_pool,
    check_images,
    is_geometric,
    iter_views,
    policy,
)
from imgpipe.learn.image_datamodule import training_augment_rows
from imgpipe.stages.demo import digits_images

OFF = {
    "rotation": 0.0,
    "hflip": False,
    "vflip": False,
    "scale": [1.0, 1.0],
    "translate": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
}
DEFAULT = {
    "on_device": True,
    "copies": 2,
    "seed": 0,
    "rotation": 10.0,
    "hflip": False,
    "vflip": False,
    "scale": [0.9, 1.1],
    "translate": 0.1,
    "brightness": 0.2,
    "contrast": 0.2,
}


def augment_images(
    images: np.ndarray, cfg: dict, copies: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """All views of images, in memory (what augment_pool streams to disk): (views, source rows)."""
    check_images(images)
    sources = np.repeat(np.arange(len(images)), copies)
    if copies == 0 or len(images) == 0:
        return np.zeros((0, *images.shape[1:]), dtype=np.uint8), sources
    return np.concatenate(list(iter_views(images, cfg, copies, seed))), sources


def digits(n=60, size=16):
    """The first n digits, upscaled to size x size, as uint8 NHWC with one channel."""
    images, labels = digits_images()
    big = np.kron(images[:n], np.ones((size // 8, size // 8), dtype=np.uint8))
    return big[..., None], labels[:n]


def only(**enabled):
    return {**OFF, **enabled}


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_dtypes_and_sources(channels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 12, 12, channels), dtype=np.uint8)
    views, sources = augment_images(images, DEFAULT, copies=3, seed=0)
    assert views.dtype == np.uint8
    assert views.shape == (21, 12, 12, channels)
    assert sources.tolist() == [i for i in range(7) for _ in range(3)]


def test_zero_copies_gives_empty_arrays_with_the_image_shape(tmp_path):
    images, _ = digits(5)
    views, sources = augment_images(images, DEFAULT, copies=0, seed=0)
    assert views.shape == (0, 16, 16, 1) and views.dtype == np.uint8 and len(sources) == 0
    out = outputs(tmp_path)
    assert augment_pool(images, np.arange(5), {**DEFAULT, "copies": 0}, out) == 0
    assert np.load(out["images"]).shape == (0, 16, 16, 1)
    assert list(pd.read_csv(out["index"]).columns) == ["aug_row", "source_id"]
    assert out["preview"].stat().st_size > 0


def test_refuses_non_uint8_or_non_nhwc():
    with pytest.raises(ValueError, match="uint8"):
        augment_images(np.zeros((2, 8, 8, 1), np.float32), DEFAULT, 1, 0)
    with pytest.raises(ValueError, match="uint8"):
        augment_images(np.zeros((2, 8, 8), np.uint8), DEFAULT, 1, 0)


def test_same_seed_same_views_and_caller_rng_untouched():
    images, _ = digits(20)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, _ = augment_images(images, DEFAULT, copies=2, seed=5)
    after = torch.rand(3)
    b, _ = augment_images(images, DEFAULT, copies=2, seed=5)
    c, _ = augment_images(images, DEFAULT, copies=2, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert torch.equal(before, after)


def test_copies_of_one_image_differ():
    images, _ = digits(10)
    views, _ = augment_images(images, DEFAULT, copies=2, seed=0)
    assert not np.array_equal(views[0::2], views[1::2])


def test_everything_off_leaves_images_untouched():
    images, _ = digits(10)
    assert not is_geometric(OFF)
    views, sources = augment_images(images, OFF, copies=2, seed=0)
    assert np.array_equal(views, images[sources])


@pytest.mark.parametrize(("flag", "axis"), [("hflip", 2), ("vflip", 1)])
def test_flip_only_views_are_exact_mirrors(flag, axis):
    images, _ = digits(20)
    views, sources = augment_images(images, only(**{flag: True}), copies=4, seed=0)
    originals = images[sources]
    mirrors = np.flip(originals, axis=axis)
    same = np.all(views == originals, axis=(1, 2, 3))
    mirrored = np.all(views == mirrors, axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert mirrored[~same].size > 0.3 * len(views)  # p = 0.5 per view


@pytest.mark.parametrize(
    "enabled",
    [{"rotation": 30.0}, {"translate": 0.25}, {"scale": [0.6, 0.8]}],
    ids=["rotation", "translate", "scale"],
)
def test_geometric_transforms_move_pixels(enabled):
    images, _ = digits(20)
    views, sources = augment_images(images, only(**enabled), copies=2, seed=0)
    originals = images[sources].astype(int)
    changed = np.any(views != originals, axis=(1, 2, 3))
    assert changed.mean() > 0.9
    # not a colour change: the background stays black in most of the image
    assert np.mean(views == 0) > 0.3


def test_scale_down_shrinks_the_digit():
    images, _ = digits(20)
    views, sources = augment_images(images, only(scale=[0.5, 0.6]), copies=1, seed=0)
    ink = (images[sources] > 64).sum(axis=(1, 2, 3))
    ink_after = (views > 64).sum(axis=(1, 2, 3))
    assert np.all(ink_after < ink)


@pytest.mark.parametrize("enabled", [{"brightness": 0.5}, {"contrast": 0.5}])
def test_colour_jitter_keeps_geometry(enabled):
    images, _ = digits(20)
    views, sources = augment_images(images, only(**enabled), copies=2, seed=0)
    originals = images[sources]
    assert np.any(views != originals, axis=(1, 2, 3)).mean() > 0.9
    # a monotone intensity map: sorting a view by its original's pixels leaves it sorted
    for view, original in zip(views, originals, strict=True):
        order = np.argsort(original.ravel(), kind="stable")
        assert np.all(np.diff(view.ravel()[order].astype(int)) >= 0)


def test_brightness_keeps_black_black():
    images, _ = digits(20)
    views, sources = augment_images(images, only(brightness=0.5), copies=2, seed=0)
    assert np.all(views[images[sources] == 0] == 0)


def test_policy_fills_switched_off_parts_and_knows_geometry():
    assert policy({"rotation": 5.0})["crop_area"] == [1.0, 1.0]
    assert is_geometric(only(hflip=True)) and is_geometric(only(crop_area=[0.5, 1.0]))
    assert not is_geometric(only(brightness=0.3, contrast=0.3))


def test_random_resized_crop_zooms_into_part_of_the_image():
    images, _ = digits(20)
    views, sources = augment_images(images, only(crop_area=[0.25, 0.3], crop_ratio=[1, 1]), 1, 0)
    # A crop of a quarter of the area shown at full size: strokes get about twice as thick.
    ink = (images[sources] > 64).sum(axis=(1, 2, 3))
    ink_after = (views > 64).sum(axis=(1, 2, 3))
    assert np.median(ink_after / np.maximum(ink, 1)) > 1.3


def test_each_image_of_a_batch_gets_its_own_draw():
    one = torch.from_numpy(digits(1)[0]).permute(0, 3, 1, 2).float() / 255
    batch = one.repeat(16, 1, 1, 1)
    views = augment_batch(batch, only(rotation=30.0, brightness=0.3))
    assert len({tuple(v.flatten()[:64].tolist()) for v in views}) == 16
    assert views.min() >= 0 and views.max() <= 1


def outputs(folder):
    return {
        "images": folder / "images.npy",
        "index": folder / "index.csv",
        "preview": folder / "preview.png",
    }


def test_stage_writes_views_with_their_sources(tmp_path):
    images, _ = digits(15)
    ids = np.arange(100, 115)
    out = outputs(tmp_path)
    cfg = {**only(hflip=True), "on_device": True, "copies": 3, "seed": 1}
    assert augment_pool(images, ids, cfg, out) == 45
    views = np.load(out["images"])
    index = pd.read_csv(out["index"])
    assert list(index.columns) == ["aug_row", "source_id"]
    assert index["aug_row"].tolist() == list(range(45))
    # with only hflip, every row is its source or the mirror of its source
    source = images[index["source_id"].to_numpy() - 100]
    assert np.all(
        np.all(views == source, axis=(1, 2, 3))
        | np.all(views == source[:, :, ::-1], axis=(1, 2, 3))
    )
    assert out["preview"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["preview"].stat().st_size > 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.npy", "index.csv", "preview.png"]
    # chunked writing gives the same rows as one call
    same, _ = augment_images(images, cfg, 3, 1)
    assert np.array_equal(views, same)


# ----- leakage: no view of a val / test / held-out image may reach training -----


def leaked_sources(aug_source_ids, rows, train_ids):
    """Source ids of selected augmented rows that are not training ids (empty when no leak)."""
    selected = np.asarray(aug_source_ids)[np.asarray(rows, dtype=np.int64)]
    return np.unique(selected[~np.isin(selected, np.asarray(train_ids))])


def assert_no_leak(aug_source_ids, rows, train_ids, forbidden_ids):
    """Every selected view comes from a training image and none from a forbidden one."""
    leaked = leaked_sources(aug_source_ids, rows, train_ids)
    assert leaked.size == 0, f"views of non-training images selected: {leaked[:10]}"
    selected = np.asarray(aug_source_ids)[rows]
    assert not np.isin(selected, forbidden_ids).any()


@pytest.fixture(scope="module")
def split_and_augment(tmp_path_factory):
    """A real split of an index with near-duplicate groups, and the augment stage's files."""
    images, labels = digits(400)
    ids = np.arange(len(labels))
    index = pd.DataFrame({"id": ids, "label": labels.astype(str), "group": ids // 2})
    roles = assign_roles(index, 0.2, 0.15, seed=0)
    pool = role_ids(roles.set_index("id")["role"], *POOL_ROLES)
    out = outputs(tmp_path_factory.mktemp("augment"))
    augment_pool(images[pool], pool, {**DEFAULT, "copies": 2}, out)
    return index, roles, pd.read_csv(out["index"])


def test_pool_is_train_and_val_only(split_and_augment):
    _, roles, aug = split_and_augment
    test_ids = roles.loc[roles["role"] == "test", "id"]
    assert not aug["source_id"].isin(test_ids).any()
    expected = roles.loc[roles["role"] != "test", "id"]
    assert aug["source_id"].value_counts().reindex(expected).eq(2).all()


def test_final_run_trains_on_views_of_train_images_only(split_and_augment):
    _, roles, aug = split_and_augment
    train_ids = roles.loc[roles["role"] == "train", "id"].to_numpy()
    forbidden = roles.loc[roles["role"] != "train", "id"].to_numpy()
    rows = training_augment_rows(aug["source_id"].to_numpy(), train_ids)
    assert_no_leak(aug["source_id"].to_numpy(), rows, train_ids, forbidden)
    # nothing lost either: both views of every training image
    assert len(rows) == 2 * len(train_ids)


def test_each_fold_trains_on_views_of_its_own_training_images(split_and_augment):
    index, roles, aug = split_and_augment
    pool = index[index["id"].isin(role_ids(roles.set_index("id")["role"], *POOL_ROLES))]
    test_ids = roles.loc[roles["role"] == "test", "id"].to_numpy()
    folds = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=0)
    for train_pos, held_pos in folds.split(pool, pool["label"], pool["group"]):
        train_ids = pool["id"].to_numpy()[train_pos]
        held_out = pool["id"].to_numpy()[held_pos]
        rows = training_augment_rows(aug["source_id"].to_numpy(), train_ids)
        assert_no_leak(
            aug["source_id"].to_numpy(), rows, train_ids, np.concatenate([held_out, test_ids])
        )
        assert len(rows) == 2 * len(train_ids)


def test_leak_check_catches_naive_selections(split_and_augment):
    _, roles, aug = split_and_augment
    sources = aug["source_id"].to_numpy()
    train_ids = roles.loc[roles["role"] == "train", "id"].to_numpy()
    forbidden = roles.loc[roles["role"] != "train", "id"].to_numpy()
    every_row = np.arange(len(sources))
    with pytest.raises(AssertionError, match="non-training"):
        assert_no_leak(sources, every_row, train_ids, forbidden)
    # positions mistaken for ids: rows 0..n_train-1 are not the training views
    with pytest.raises(AssertionError, match="non-training"):
        assert_no_leak(sources, np.arange(len(train_ids)), train_ids, forbidden)
