"""The clean stage's decisions, on stats tables built from real arrays with imgpipe.images.measure."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers.pair_utils import hash_pairs
from hypothesis import given, settings
from hypothesis import strategies as st

from imgpipe.core.errors import DataError
from imgpipe.data.dataset import INDEX_COLUMNS, load_images, load_index
from imgpipe.images import measure as imagestats
from imgpipe.images import near_duplicates
from imgpipe.images import quality as clean
from imgpipe.images.quality import CleanSettings
from imgpipe.stages.demo import digits_images
from imgpipe.workflow.settings import filled

SIZE = 16

# ----------------------------------------------------------------------------- image makers


def texture(rng: np.random.Generator, h: int = 48, w: int = 48) -> np.ndarray:
    """Photo-like grey texture: random phases with a natural 1/f amplitude spectrum."""
    f2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
    spectrum = (rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w))) / np.maximum(
        f2, 1e-4
    ) ** 0.5
    image = np.real(np.fft.ifft2(spectrum))
    image = (image - image.min()) / (image.max() - image.min()) * 255
    return image.astype(np.uint8)


def plain_image(rng: np.random.Generator, kind: int) -> np.ndarray:
    """A letter, a shape or line art on a plain background, 16..64 px, grey or colour."""
    h = int(rng.integers(16, 65))
    w = int(np.clip(h * rng.uniform(0.7, 1.4), 16, 64))
    bg = int(rng.integers(0, 256))
    fg = int((bg + rng.integers(80, 177)) % 256)
    image = np.full((h, w), bg, np.uint8)
    line = cv2.LINE_AA if rng.random() < 0.5 else cv2.LINE_8
    if kind == 0:
        text = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnpqrstuvwxyz23456789"[rng.integers(52)]
        font = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX][
            rng.integers(3)
        ]
        thickness = int(rng.integers(1, 3))
        (tw, th), base = cv2.getTextSize(text, font, 1.0, thickness)
        scale = 0.8 * min(w / tw, h / (th + base))
        (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
        cv2.putText(image, text, ((w - tw) // 2, (h + th) // 2), font, scale, fg, thickness, line)
    elif kind == 1:
        r = int(min(h, w) * rng.uniform(0.2, 0.4))
        centre = (w // 2, h // 2)
        if rng.random() < 0.5:
            cv2.circle(image, centre, r, fg, -1 if rng.random() < 0.5 else 1, line)
        else:
            cv2.rectangle(
                image, (centre[0] - r, centre[1] - r), (centre[0] + r, centre[1] + r), fg, 2
            )
    else:
        for _ in range(int(rng.integers(2, 4))):
            a, b = rng.integers(0, (w, h), size=(2, 2))
            cv2.line(image, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), fg, 1, line)
    if rng.random() < 0.3:
        image = np.clip(image[..., None] * rng.uniform(0.4, 1.0, 3), 0, 255).astype(np.uint8)
    return image


# ----------------------------------------------------------------------------- stats tables


def stats_row(
    image: np.ndarray, label: str, relpath: str, source: str = "train"
) -> tuple[dict, np.ndarray]:
    """One stats.csv row (columns of docs/architecture.md) and the image's resized array."""
    gray = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    if gray.ndim == 3:
        gray = cv2.cvtColor(gray, cv2.COLOR_BGR2GRAY)
    h, w = image.shape[:2]
    row = {
        "path": f"/data/{source}/{relpath}",
        "relpath": relpath,
        "label": str(label),
        "source": source,
        "bytes": int(image.nbytes),
        "sha256": hashlib.sha256(image.tobytes()).hexdigest(),
        "width": w,
        "height": h,
        "channels": 1 if image.ndim == 2 else image.shape[2],
        "bit_depth": 8,
        "status": "ok",
        "reason": "",
        "detail": "",
        "pixel_hash": hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()[:32],
        **imagestats.gray_stats(gray),
        "thumb": imagestats.format_thumbnail(imagestats.thumbnail(gray)),
    }
    return row, cv2.resize(gray, (SIZE, SIZE), interpolation=cv2.INTER_AREA)[..., None]


def failed_row(label: str, relpath: str, reason: str) -> tuple[dict, np.ndarray]:
    """A row ingest already rejected (no pixels: zeros in the array)."""
    row = {"path": f"/data/train/{relpath}", "relpath": relpath, "label": label, "source": "train"}
    row.update(
        status="rejected",
        reason=reason,
        detail=f"{reason} at ingest",
        pixel_hash="",
        thumb="",
    )
    return row, np.zeros((SIZE, SIZE, 1), np.uint8)


def write_shards(
    rows: list[tuple[dict, np.ndarray]], out: Path, shards: int = 2
) -> tuple[list[Path], list[Path]]:
    """Write rows j to shard j % shards as stats.csv + images.npy, like ingest_shard."""
    stats_paths, image_paths = [], []
    for shard in range(shards):
        folder = out / f"shard-{shard}"
        folder.mkdir(parents=True, exist_ok=True)
        mine = rows[shard::shards]
        table = pd.DataFrame([{**row, "row": k} for k, (row, _) in enumerate(mine)])
        arrays = np.stack([a for _, a in mine]) if mine else np.zeros((0, SIZE, SIZE, 1), np.uint8)
        table.to_csv(folder / "stats.csv", index=False)
        np.save(folder / "images.npy", arrays)
        stats_paths.append(folder / "stats.csv")
        image_paths.append(folder / "images.npy")
    return stats_paths, image_paths


def clean_settings(**overrides) -> CleanSettings:
    """The clean section's decision settings: the schema's defaults with ``overrides``."""
    return CleanSettings.from_config(filled("clean", overrides))


def decide(rows: list, tmp_path: Path, shards: int = 2, **overrides) -> clean.Decisions:
    """Write the rows as shards, read them back and run every clean decision."""
    stats = clean.read_stats(*write_shards(rows, tmp_path, shards))
    return clean.decide(stats, clean_settings(**overrides))


def outcome(decisions: clean.Decisions) -> dict[str, str]:
    """relpath -> reason ('' = kept)."""
    return dict(zip(decisions.stats["relpath"], decisions.reason, strict=True))


def filler(
    rng: np.random.Generator, labels: tuple[str, ...] = ("a", "b"), per_label: int = 3
) -> list:
    """Distinct sharp textures so that every class survives."""
    return [
        stats_row(texture(rng), label, f"{label}/fill{k}.png")
        for label in labels
        for k in range(per_label)
    ]


# ----------------------------------------------------------------------------- per-image checks


def with_copies(seed: int, places: list[tuple[str, str]], base=None) -> list:
    """Filler rows (or ``base(rng)``) plus one random texture written at each (label, relpath)."""
    rng = np.random.default_rng(seed)
    image = texture(rng)
    rows = (base or filler)(rng)
    return rows + [stats_row(image, label, relpath) for label, relpath in places]


def test_each_quality_check_rejects_its_defect_and_keeps_its_lookalike(tmp_path):
    rng = np.random.default_rng(0)
    photo = texture(rng)
    black = np.zeros((48, 48), np.uint8)
    thin_line_on_black = black.copy()
    cv2.line(thin_line_on_black, (5, 5), (20, 9), 255, 1)
    ink_on_white = np.full((64, 64), 255, np.uint8)
    cv2.line(ink_on_white, (3, 50), (30, 40), 0, 1)
    rows = filler(rng) + [
        stats_row(np.full((32, 32), 128, np.uint8), "a", "a/constant.png"),
        stats_row(np.zeros((32, 32), np.uint8), "a", "a/black.png"),
        stats_row(np.full((32, 32), 250, np.uint8), "a", "a/white.png"),
        stats_row((texture(rng) // 16).astype(np.uint8), "a", "a/near_black.png"),
        stats_row((240 + texture(rng) // 17).astype(np.uint8), "a", "a/near_white.png"),
        stats_row(cv2.GaussianBlur(photo, (0, 0), 2.5), "a", "a/blurred.png"),
        stats_row(photo[:4, :4], "a", "a/tiny.png"),
        stats_row(texture(rng, 10, 120), "b", "b/strip.png"),
        stats_row(texture(rng, 1, 50), "b", "b/one_pixel_strip.png"),
        stats_row(thin_line_on_black, "b", "b/thin_line_on_black.png"),
        stats_row(ink_on_white, "b", "b/ink_on_white.png"),
    ]
    got = outcome(decide(rows, tmp_path))
    assert got["a/constant.png"] == "low_information"
    assert (got["a/black.png"], got["a/white.png"]) == ("too_dark", "too_bright")
    assert got["a/near_black.png"] == "too_dark"
    assert got["a/near_white.png"] == "too_bright"
    assert got["a/blurred.png"] == "blurry"
    assert got["a/tiny.png"] == "too_small"
    assert got["b/strip.png"] == "odd_aspect"
    assert got["b/one_pixel_strip.png"] == "too_small"
    assert got["b/thin_line_on_black.png"] == ""
    assert got["b/ink_on_white.png"] == ""


def test_details_say_which_measure_failed_and_thresholds_switch_off(tmp_path):
    rng = np.random.default_rng(1)
    rows = filler(rng) + [
        stats_row(np.full((32, 32), 128, np.uint8), "a", "a/constant.png"),
        stats_row(cv2.GaussianBlur(texture(rng), (0, 0), 3), "b", "b/blurred.png"),
    ]
    decisions = decide(rows, tmp_path / "on")
    detail = dict(zip(decisions.stats["relpath"], decisions.detail, strict=True))
    assert detail["a/constant.png"] == "std 0 < 2"
    assert detail["b/blurred.png"].startswith("blur 0.") and detail["b/blurred.png"].endswith(
        "< 0.25"
    )
    got = outcome(decide(rows, tmp_path / "off", low_information=None, dark=None, blur=None))
    assert got["b/blurred.png"] == ""
    assert got["a/constant.png"] == ""  # a constant grey is neither dark nor bright


def test_ingest_rejections_pass_through_with_their_reason(tmp_path):
    rng = np.random.default_rng(2)
    rows = filler(rng) + [failed_row("a", "a/broken.png", "truncated")]
    decisions = decide(rows, tmp_path)
    rejected = clean.rejected_table(decisions).set_index("relpath")
    assert rejected.loc["a/broken.png", "reason"] == "truncated"
    assert rejected.loc["a/broken.png", "detail"] == "truncated at ingest"


def test_rows_without_hashes_are_never_duplicates_of_each_other(tmp_path):
    rng = np.random.default_rng(13)
    rows = filler(rng)
    for row, _ in rows[:3]:
        row["pixel_hash"] = ""
    assert decide(rows, tmp_path).kept.all()


# ----------------------------------------------------------------------------- exact duplicates


def test_exact_duplicates_across_shards_keep_the_first_by_path(tmp_path):
    rows = with_copies(3, [("a", "a/z_copy.png"), ("a", "a/m_copy.png"), ("a", "a/c_original.png")])
    # Three shards: the copies land in different shard files.
    decisions = decide(rows, tmp_path, shards=3)
    assert set(
        decisions.stats.loc[decisions.stats["relpath"].str.contains("copy|original"), "shard"]
    ) == {0, 1, 2}
    got = outcome(decisions)
    assert got["a/c_original.png"] == ""
    assert got["a/m_copy.png"] == got["a/z_copy.png"] == "exact_duplicate"
    details = set(decisions.detail[decisions.reason == "exact_duplicate"])
    assert details == {"duplicate of /data/train/a/c_original.png"}
    assert outcome(decide(rows, tmp_path / "off", exact_duplicates=False))["a/z_copy.png"] == ""


def test_label_conflicts_reject_every_copy_before_duplicates(tmp_path):
    rows = with_copies(4, [("a", "a/x.png"), ("a", "a/y.png"), ("b", "b/x.png")])
    decisions = decide(rows, tmp_path, shards=2)
    got = outcome(decisions)
    assert got["a/x.png"] == got["a/y.png"] == got["b/x.png"] == "label_conflict"
    detail = dict(zip(decisions.stats["relpath"], decisions.detail, strict=True))
    assert detail["b/x.png"] == "same pixels as /data/train/a/x.png labelled 'a'"
    assert detail["a/y.png"] == "same pixels as /data/train/b/x.png labelled 'b'"
    # Switched off, the copies become ordinary duplicates: the first survives.
    got = outcome(decide(rows, tmp_path / "off", label_conflicts=False))
    assert (got["a/x.png"], got["a/y.png"], got["b/x.png"]) == (
        "",
        "exact_duplicate",
        "exact_duplicate",
    )


# ----------------------------------------------------------------------------- near duplicates


def near_copies(rng: np.random.Generator) -> list:
    """Two textures, each with two noisy re-encodings (near duplicates), plus fillers."""
    rows = filler(rng, per_label=2)
    for name in ("p", "q"):
        image = texture(rng)
        rows.append(stats_row(image, "a", f"a/{name}0.png"))
        for k in (1, 2):
            noisy = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
            rows.append(stats_row(noisy, "a", f"a/{name}{k}.png"))
    return rows


def test_near_duplicates_group_drop_and_off(tmp_path):
    rows = near_copies(np.random.default_rng(5))
    grouped = decide(rows, tmp_path / "group")
    assert grouped.kept.all()
    index = clean.index_table(grouped).set_index("relpath")
    for name in ("p", "q"):
        members = index.loc[[f"a/{name}{k}.png" for k in range(3)]]
        assert members["group"].nunique() == 1
        assert members["group"].iat[0] == members["id"].min()
    assert index.loc["a/p0.png", "group"] != index.loc["a/q0.png", "group"]
    singles = index[~index.index.str.match(r"a/[pq]\d")]
    assert (singles["group"] == singles["id"]).all()

    dropped = outcome(decide(rows, tmp_path / "drop", near_duplicates="drop"))
    assert [dropped[f"a/p{k}.png"] for k in range(3)] == ["", "near_duplicate", "near_duplicate"]

    off = decide(rows, tmp_path / "off", near_duplicates="off")
    assert off.kept.all()
    assert clean.index_table(off)["group"].is_unique


def test_digits_keep_over_99_percent_and_groups_stay_small(tmp_path):
    images, labels = digits_images()
    rows = [
        stats_row(image, str(label), f"{label}/{k:04d}.png")
        for k, (image, label) in enumerate(zip(images, labels, strict=True))
    ]
    decisions = decide(rows, tmp_path)
    assert decisions.kept.mean() > 0.99
    sizes = near_duplicates.group_sizes(clean.index_table(decisions)["group"].to_numpy())
    smallest_class = np.bincount(labels).min()
    assert sizes["max_group_size"] <= 5
    assert sizes["max_group_size"] < 0.01 * smallest_class

    # Loose thresholds make chains: their connected components snowball,
    # the star groups shown to the user stay several times smaller.
    sig = near_duplicates.Signatures.from_stats(decisions.stats)
    ones = np.flatnonzero(decisions.stats["label"].isin(["1", "7"]).to_numpy())
    links = near_duplicates.link_components(sig, ones, 8, 0.98)
    components = np.bincount(links.component).max()
    stars = np.bincount(links.leader).max()
    assert components > 40 and stars * 5 < components


def test_letters_icons_and_line_art_on_plain_backgrounds_keep_over_99_percent(tmp_path):
    rng = np.random.default_rng(7)
    rows = [
        stats_row(plain_image(rng, k % 3), str(k % 3), f"{k % 3}/{k:04d}.png") for k in range(1500)
    ]
    decisions = decide(rows, tmp_path)
    assert decisions.kept.mean() > 0.99, pd.Series(decisions.reason[~decisions.kept]).value_counts()
    assert (
        near_duplicates.group_sizes(clean.index_table(decisions)["group"].to_numpy())[
            "max_group_size"
        ]
        <= 5
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 300),
    distance=st.integers(0, 8),
    bands=st.integers(1, 9),
)
def test_hash_pairs_match_brute_force(seed, n, distance, bands):
    rng = np.random.default_rng(seed)
    # Few distinct 64-bit bases with a few flipped bits: many close pairs.
    bases = rng.integers(0, 2**64, size=max(n // 20, 1), dtype=np.uint64)
    flips = rng.integers(0, 2**64, size=(3, n), dtype=np.uint64)
    flips = flips[0] & flips[1] & flips[2]
    hashes = bases[rng.integers(0, len(bases), size=n)] ^ flips
    i, j, d = hash_pairs(hashes, distance)
    full = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    want_i, want_j = np.nonzero(np.triu(full <= distance, k=1))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(
        zip(want_i.tolist(), want_j.tolist(), strict=True)
    )
    assert (d == full[i, j]).all()
    # Any exact plan (bands searched within radius distance // bands), as a
    # self search and as a search of one set in another, finds the same pairs.
    bands = max(bands, distance // 3 + 1)  # radius <= 2: a few thousand probes at most
    plan = (near_duplicates._bands(bands), distance // bands)
    found = [
        np.stack(p, 1) for p in near_duplicates.hash_join(hashes, hashes, distance, True, 64, plan)
    ]
    pairs = np.concatenate(found) if found else np.zeros((0, 2), int)
    assert sorted(map(tuple, pairs.tolist())) == sorted(
        zip(want_i.tolist(), want_j.tolist(), strict=True)
    )
    half = n // 2
    found = [
        np.stack(p, 1)
        for p in near_duplicates.hash_join(hashes[:half], hashes[half:], distance, plan=plan)
    ]
    pairs = np.concatenate(found) if found else np.zeros((0, 2), int)
    want = np.argwhere(full[:half, half:] <= distance)
    assert sorted(map(tuple, pairs.tolist())) == sorted(map(tuple, want.tolist()))


def test_search_plan_probes_within_a_radius_when_that_is_cheaper():
    rng = np.random.default_rng(0)
    few = rng.integers(0, 2**64, size=100, dtype=np.uint64)
    assert near_duplicates.search_plan(few, few, 5)[1] == 0  # few hashes: exact bands
    many = rng.integers(0, 2**64, size=100_000, dtype=np.uint64)
    bands, radius = near_duplicates.search_plan(many, many, 5)
    assert radius >= 1 and len(bands) * (radius + 1) > 5


# ----------------------------------------------------------------------------- test leak, small class, errors


def test_test_images_duplicating_training_images_are_leaks(tmp_path):
    rng = np.random.default_rng(8)
    seen, similar, fresh = texture(rng), texture(rng), texture(rng)
    noisy = np.clip(similar + rng.normal(0, 2, similar.shape), 0, 255).astype(np.uint8)
    rows = filler(rng) + [
        stats_row(seen, "a", "a/seen.png"),
        stats_row(similar, "b", "b/similar.png"),
        stats_row(seen, "a", "a/seen.png", source="test"),
        stats_row(noisy, "b", "b/similar_noisy.png", source="test"),
        stats_row(fresh, "b", "b/fresh.png", source="test"),
    ]
    decisions = decide(rows, tmp_path)
    reasons = {
        (s, r): reason
        for s, r, reason in zip(
            decisions.stats["source"], decisions.stats["relpath"], decisions.reason, strict=True
        )
    }
    assert reasons["test", "a/seen.png"] == "test_leak"
    assert reasons["test", "b/similar_noisy.png"] == "test_leak"
    assert reasons["test", "b/fresh.png"] == ""
    keys = zip(decisions.stats["source"], decisions.stats["relpath"], strict=True)
    details = dict(zip(keys, decisions.detail, strict=True))
    assert details["test", "a/seen.png"] == "same pixels as training image /data/train/a/seen.png"
    assert details["test", "b/similar_noisy.png"].startswith(
        "near duplicate of training image /data/train/b/similar.png (hash distance "
    )
    assert clean.summary(decisions, clean_settings())["leakage"] == {"test_leak": 2}


def test_small_classes_are_rejected_whole(tmp_path):
    rng = np.random.default_rng(9)
    rows = filler(rng, labels=("a", "b"), per_label=3) + filler(rng, labels=("rare",), per_label=2)
    got = outcome(decide(rows, tmp_path, min_per_class=3))
    assert [got[f"rare/fill{k}.png"] for k in range(2)] == ["small_class", "small_class"]
    assert all(got[f"{label}/fill{k}.png"] == "" for label in "ab" for k in range(3))


def test_nothing_or_one_class_left_stops_with_a_clear_message(tmp_path):
    flat = [stats_row(np.full((20, 20), v, np.uint8), "a", f"a/{v}.png") for v in (60, 100, 200)]
    with pytest.raises(
        DataError, match=r"no image survived cleaning \(3 listed; rejected: low_information 3\)"
    ):
        clean.check_trainable(decide(flat, tmp_path / "none"))
    rng = np.random.default_rng(10)
    one = filler(rng, labels=("a",)) + flat
    with pytest.raises(
        DataError, match=r"only 1 class \('a'\) survived cleaning; training needs at least two"
    ):
        clean.check_trainable(decide(one, tmp_path / "one"))
    only_test = [stats_row(texture(rng), label, f"{label}/t.png", source="test") for label in "ab"]
    # Test images of classes without training images fall as small classes.
    with pytest.raises(
        DataError, match=r"no image survived cleaning \(2 listed; rejected: small_class 2\)"
    ):
        clean.check_trainable(decide(only_test, tmp_path / "test", min_per_class=1))


# ----------------------------------------------------------------------------- outputs


def test_run_clean_writes_index_rejected_summary_and_examples(tmp_path):
    rows = with_copies(11, [("b", "b/dup1.png"), ("b", "b/dup0.png")], base=near_copies) + [
        stats_row(np.full((30, 30), 90, np.uint8), "b", "b/flat.png"),
        failed_row("b", "b/empty.png", "zero_byte"),
    ]
    stats_paths, image_paths = write_shards(rows, tmp_path / "ingest")
    outputs = {
        name: tmp_path / "clean" / f"{name}.out"
        for name in ("index", "rejected", "summary", "examples")
    }
    result = clean.clean_shards(
        stats_paths, image_paths, outputs, clean_settings(), examples_per_reason=3
    )

    index = load_index(outputs["index"])
    assert index.columns.tolist() == INDEX_COLUMNS
    assert index["id"].tolist() == list(range(len(index)))
    assert index.sort_values(["source", "relpath"])["id"].tolist() == index["id"].tolist()
    assert set(index["array"]) == {str(p) for p in image_paths}
    # The rows point at the right pixels.
    expected = {r["relpath"]: a for r, a in rows}
    loaded = load_images(index)
    assert all((loaded[k] == expected[rel]).all() for k, rel in enumerate(index["relpath"]))

    rejected = pd.read_csv(outputs["rejected"], keep_default_na=False).set_index("relpath")
    assert rejected.loc["b/dup1.png", "reason"] == "exact_duplicate"
    assert rejected.loc["b/empty.png", "reason"] == "zero_byte"
    assert rejected.loc["b/flat.png", "reason"] == "low_information"
    summary = json.loads(Path(outputs["summary"]).read_text())
    assert summary == result
    assert summary["total"] == {"listed": len(rows), "kept": len(index), "rejected": 3}
    assert summary["rejected_per_reason"] == {
        "exact_duplicate": 1,
        "low_information": 1,
        "zero_byte": 1,
    }
    assert summary["kept_per_class"] == {"a": 8, "b": 3}
    assert summary["near_duplicates"]["max_group_size"] == 3
    assert summary["near_duplicates"]["groups_above_one"] == 2
    assert summary["near_duplicates"]["components_above_one"] == 2
    assert summary["near_duplicates"]["max_component_size"] == 3
    assert summary["settings"]["blur"] == clean_settings().blur
    figure = cv2.imread(str(outputs["examples"]))
    assert figure is not None and figure.shape[0] > 50
    assert not list((tmp_path / "clean").glob(".*"))  # no temp files left behind


def test_decisions_do_not_depend_on_shard_count_or_listing_order(tmp_path):
    rows = with_copies(12, [("b", "b/dup1.png"), ("b", "b/dup0.png")], base=near_copies)
    first = decide(rows, tmp_path / "two", shards=2)
    order = np.random.default_rng(0).permutation(len(rows))
    second = decide([rows[k] for k in order], tmp_path / "three", shards=3, min_per_class=2)
    columns = ["id", "relpath", "label", "group"]
    pd.testing.assert_frame_equal(
        clean.index_table(first)[columns], clean.index_table(second)[columns]
    )
    pd.testing.assert_frame_equal(clean.rejected_table(first), clean.rejected_table(second))


# ----------------------------------------------------------------------------- with the real ingest


def test_end_to_end_from_png_files_through_ingest(tmp_path):
    from imgpipe.data import ingest, listing

    root = tmp_path / "tree"
    images, labels = digits_images()
    for k in range(120):
        folder = root / str(labels[k])
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{k:04d}.png"), images[k])
    # An exact copy that lands in the other shard, a blank, an empty file.
    (root / str(labels[0]) / "0000_copy.png").write_bytes(
        (root / str(labels[0]) / "0000.png").read_bytes()
    )
    cv2.imwrite(str(root / "3" / "blank.png"), np.full((8, 8), 255, np.uint8))
    (root / "3" / "empty.png").write_bytes(b"")

    files = listing.list_images(root, [".png"])
    work = tmp_path / "ingest"
    for shard in range(2):
        ingest.index_shard(
            files,
            shard,
            2,
            {"size": 16, "mode": "gray", "fit": "pad"},
            10**8,
            work / f"shard-{shard}" / "stats.csv",
            work / f"shard-{shard}" / "images.npy",
        )
    outputs = {
        name: tmp_path / "clean" / f"{name}.out"
        for name in ("index", "rejected", "summary", "examples")
    }
    stats_paths = [work / f"shard-{s}" / "stats.csv" for s in range(2)]
    image_paths = [work / f"shard-{s}" / "images.npy" for s in range(2)]
    result = clean.clean_shards(stats_paths, image_paths, outputs, clean_settings())

    rejected = pd.read_csv(outputs["rejected"], keep_default_na=False).set_index("relpath")
    assert rejected.loc[f"{labels[0]}/0000_copy.png", "reason"] == "exact_duplicate"
    assert rejected.loc["3/blank.png", "reason"] == "too_bright"
    assert rejected.loc["3/empty.png", "reason"] == "zero_byte"
    assert result["total"] == {"listed": 123, "kept": 120, "rejected": 3}
    index = load_index(outputs["index"])
    loaded = load_images(index)
    assert loaded.shape == (120, 16, 16, 1)
    # Each kept row's array is its own digit (brightest where the digit is).
    for k in (0, 57, 119):
        digit = images[int(Path(index["relpath"].iat[k]).stem)]
        assert (
            np.corrcoef(
                cv2.resize(loaded[k], (8, 8), interpolation=cv2.INTER_AREA).ravel(), digit.ravel()
            )[0, 1]
            > 0.8
        )
