"""Issue 11, point 1: near duplicates never straddle a split or a fold, and are found.

- components: every linked pair shares ``group`` (the connected component),
  chains included, however many images share one hash;
- recall: JPEG re-encodes, one-pixel resizes and one-pixel shifts of small
  real images are linked, distinct digits are not;
- the demo with planted copies: every pair a brute-force scan links lies within
  one role and one fold.
"""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from helpers.pair_utils import hash_pairs
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from test_clean import decide, filler, stats_row, texture, write_shards

from imgpipe.data.ingest import measure_images
from imgpipe.data.split import assign_roles
from imgpipe.images import measure as imagestats
from imgpipe.images import near_duplicates
from imgpipe.images import quality as clean
from imgpipe.images.decode import decode_image
from imgpipe.images.quality import CleanSettings
from imgpipe.learn.cv import assign_folds
from imgpipe.stages.demo import digits_images
from imgpipe.workflow.settings import filled

SETTINGS = CleanSettings.from_config(filled("clean"))
SHIFTS = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]
KINDS = ("jpeg60", "resize_up", "resize_down", "shift")

# ----------------------------------------------------------------------------- planted copies


def reencode(image: np.ndarray, ext: str = ".png", quality: int | None = None) -> np.ndarray:
    """The image written as a file and decoded back in grey, as ingest reads it."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if quality else []
    ok, data = cv2.imencode(ext, image, params)
    assert ok
    return decode_image(data.tobytes(), "gray").image


def planted_copy(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A near copy of ``image`` (grey or BGR uint8), decoded in grey like ingest does.

    jpeg60: re-encoded as JPEG quality 60; resize_up / resize_down: one pixel
    larger (OpenCV's default, bilinear) or smaller (box filter) on each side;
    shift: moved by one pixel (one of 8 directions), the border repeated.
    """
    h, w = image.shape[:2]
    if kind == "jpeg60":
        return reencode(image, ".jpg", 60)
    if kind == "resize_up":
        return reencode(cv2.resize(image, (w + 1, h + 1), interpolation=cv2.INTER_LINEAR))
    if kind == "resize_down":
        return reencode(cv2.resize(image, (w - 1, h - 1), interpolation=cv2.INTER_AREA))
    if kind == "shift":
        dx, dy = SHIFTS[rng.integers(len(SHIFTS))]
        move = np.float32([[1, 0, dx], [0, 1, dy]])
        return reencode(cv2.warpAffine(image, move, (w, h), borderMode=cv2.BORDER_REPLICATE))
    raise ValueError(kind)


def photo(rng: np.random.Generator) -> np.ndarray:
    """A photo-like BGR image, 64..128 px: smooth colour gradients, shapes, blur and noise."""
    h = int(rng.integers(64, 129))
    w = int(np.clip(h * rng.uniform(0.8, 1.25), 64, 128))
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, c0 = rng.uniform(-150, 150, 3)
        image[..., c] = 128 + a * (x - 0.5) + b * (y - 0.5) + c0 * (x - 0.5) * (y - 0.5)
    for _ in range(int(rng.integers(3, 8))):
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(4, max(h, w) // 3))
        shape = rng.integers(3)
        if shape == 0:
            cv2.circle(image, (cx, cy), r, colour, -1, cv2.LINE_AA)
        elif shape == 1:
            cv2.rectangle(image, (cx - r, cy - r // 2), (cx + r, cy + r // 2), colour, -1)
        else:
            end = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(image, (cx, cy), end, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.5))
    image += rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def measured_row(gray: np.ndarray, label: str, relpath: str, source: str = "train") -> dict:
    """The stats.csv row ingest writes for a decoded grey image (fields from measure_images)."""
    fields = measure_images([gray])[0]
    names = ["pixel_hash", "mean", "std", "p01", "p99", "blur", "thumb"]
    h, w = gray.shape[:2]
    return {
        "path": f"/data/{source}/{relpath}",
        "relpath": relpath,
        "label": label,
        "source": source,
        "sha256": fields[0],
        "width": w,
        "height": h,
        "status": "ok",
        "reason": "",
        "detail": "",
        **dict(zip(names, fields, strict=True)),
    }


def signatures(grays: list[np.ndarray]) -> near_duplicates.Signatures:
    """Signatures of decoded grey images, through ingest's measurements."""
    return near_duplicates.Signatures.from_stats(
        pd.DataFrame([measured_row(g, "x", f"{k}.png") for k, g in enumerate(grays)])
    )


def linked(sig: near_duplicates.Signatures, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The near-duplicate test with the default limits, pair by pair."""
    r = sig.compare(i, j, SETTINGS.near_duplicate_distance)[1]
    return r >= SETTINGS.near_duplicate_correlation


def brute_force_links(
    sig: near_duplicates.Signatures, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every linked pair among ``rows`` by scanning all pairs (no index, no union-find)."""
    found_i, found_j = [], []
    for a in range(len(rows)):
        b = np.arange(a + 1, len(rows))
        keep = b[linked(sig, np.full(len(b), rows[a]), rows[b])] if len(b) else b
        found_i.append(np.full(len(keep), a))
        found_j.append(keep)
    return np.concatenate(found_i), np.concatenate(found_j)


def brute_force_links_fast(sig: near_duplicates.Signatures) -> tuple[np.ndarray, np.ndarray]:
    """Every linked pair of sig's rows: hash distances of all pairs, correlations of the close ones."""
    n = len(sig)
    found_i, found_j = [], []
    for start in range(0, n, 256):
        a = np.arange(start, min(start + 256, n))
        i, j = np.meshgrid(a, np.arange(n), indexing="ij")
        upper = j > i
        i, j = i[upper], j[upper]
        close = sig.hash_distance(i, j) <= SETTINGS.near_duplicate_distance
        i, j = i[close], j[close]
        keep = linked(sig, i, j)
        found_i.append(i[keep])
        found_j.append(j[keep])
    return np.concatenate(found_i), np.concatenate(found_j)


# ----------------------------------------------------------------------------- components


def blend_chain(rng: np.random.Generator, n: int, step: float = 0.033) -> list[np.ndarray]:
    """Textures blended from one into another by ``step``: neighbours linked, two steps apart not."""
    first, last = texture(rng).astype(float), texture(rng).astype(float)
    return [
        np.clip((1 - step * k) * first + step * k * last, 0, 255).astype(np.uint8) for k in range(n)
    ]


def test_near_duplicate_chain_is_one_component(tmp_path):
    rng = np.random.default_rng(6)
    chain = blend_chain(rng, 10)
    rows = filler(rng) + [stats_row(im, "a", f"a/chain{k}.png") for k, im in enumerate(chain)]
    decisions = decide(rows, tmp_path)
    index = clean.index_table(decisions)
    on_chain = index[index["relpath"].str.startswith("a/chain")]
    # The chain as the test sees it: A~B~C~... but no two-step links.
    sig = near_duplicates.Signatures.from_stats(decisions.stats)
    positions = np.flatnonzero(decisions.stats["relpath"].str.startswith("a/chain").to_numpy())
    i, j = brute_force_links(sig, positions)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(k, k + 1) for k in range(9)]

    assert on_chain["group"].nunique() == 1  # one component: split and folds keep it whole
    assert on_chain["group"].iat[0] == on_chain["id"].min()
    stars = on_chain.groupby("near_group").size()
    assert stars.max() == 2 and len(stars) == 5  # the report's groups do not snowball
    others = index[~index["relpath"].str.startswith("a/chain")]
    assert (others["group"] == others["id"]).all() and (others["near_group"] == others["id"]).all()


def test_components_of_a_chain_in_the_workflow_split_and_folds(tmp_path):
    rng = np.random.default_rng(16)
    rows = filler(rng, labels=("a", "b"), per_label=12)
    for name, label in (("p", "a"), ("q", "b")):
        rows += [
            stats_row(im, label, f"{label}/{name}{k}.png")
            for k, im in enumerate(blend_chain(rng, 8))
        ]
    index = clean.index_table(decide(rows, tmp_path))
    roles = assign_roles(index, 0.25, 0.25, seed=3).set_index("id")["role"]
    folds = assign_folds(index, 3, False, seed=3).set_index("id")["fold"]
    for name in ("a/p", "b/q"):
        members = index[index["relpath"].str.startswith(name)]
        assert len(members) == 8 and members["group"].nunique() == 1
        assert roles[members["id"]].nunique() == 1 and folds[members["id"]].nunique() == 1


def test_no_candidate_cap_for_identical_hashes(tmp_path):
    # 300 identical hashes: every one of the 44,850 pairs is a candidate.
    hashes = np.full(300, 0x0123456789ABCDEF, dtype=np.uint64)
    i, j, d = hash_pairs(hashes, SETTINGS.near_duplicate_distance)
    assert len(i) == 300 * 299 // 2 and (d == 0).all()

    # 300 noisy copies of one image (one hash): one component, one star.
    rng = np.random.default_rng(21)
    image = texture(rng)
    copies = [
        np.clip(image + rng.normal(0, 1.5, image.shape), 0, 255).astype(np.uint8)
        for _ in range(300)
    ]
    rows = filler(rng) + [stats_row(c, "a", f"a/copy{k:03d}.png") for k, c in enumerate(copies)]
    decisions = decide(rows, tmp_path)
    sig = near_duplicates.Signatures.from_stats(decisions.stats)
    crowd = np.flatnonzero(decisions.stats["relpath"].str.startswith("a/copy").to_numpy())
    assert len(set(sig.hashes[(0, 0)][crowd].tolist())) < 10
    index = clean.index_table(decisions)
    on_crowd = index[index["relpath"].str.startswith("a/copy")]
    assert on_crowd["group"].nunique() == 1 and on_crowd["near_group"].nunique() == 1
    near = clean.summary(decisions, SETTINGS)["near_duplicates"]
    assert near["max_component_size"] == 300 and near["max_group_size"] == 300
    assert near["large_components"][0]["size"] == 300


def test_a_crowd_costs_comparisons_and_memory_per_image_not_per_pair():
    n = 2500
    thumb = texture(np.random.default_rng(3), 16, 16)
    text = imagestats.format_thumbnail(thumb)
    sig = near_duplicates.Signatures.from_stats(
        pd.DataFrame({"thumb": [text] * n, "width": 16, "height": 16})
    )
    tracemalloc.start()
    links = near_duplicates.link_components(
        sig, np.arange(n), 5, SETTINGS.near_duplicate_correlation
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert links.candidate_pairs == n * (n - 1) // 2  # 3 million pairs, streamed
    assert (links.component == 0).all() and (links.leader == 0).all()
    # One comparison per image to merge, one per image to draw the star.
    assert links.correlations_computed <= 2 * n + near_duplicates.PAIR_CHUNK // 16
    assert peak < 32 * 2**20  # the pairs alone would take 50 MB


def test_candidate_pairs_are_every_hash_close_pair_once():
    # Native-size digits and larger photo-like images (sub-pixel ones), with
    # copies: the shifted searches, the ones both ways round and the test /
    # training search each report every hash-close pair exactly once.
    rng = np.random.default_rng(2)
    images = [reencode(d) for d in digits_images()[0][:300]]
    images += [reencode(photo(rng)) for _ in range(30)]
    images += [planted_copy(digits_images()[0][k], "shift", rng) for k in range(60)]
    images += [reencode(cv2.resize(photo(rng), (20, 12))) for _ in range(20)]
    sig = signatures(images)
    distance = SETTINGS.near_duplicate_distance
    n = len(sig)
    i, j = np.triu_indices(n, 1)
    want = set(zip(*(x[sig.hash_distance(i, j) <= distance].tolist() for x in (i, j)), strict=True))
    rows = np.arange(n)
    found = [
        pair
        for a, b in sig.candidates(rows, rows, distance, same=True)
        for pair in zip(a.tolist(), b.tolist(), strict=True)
    ]
    assert len(found) == len(set(found)) and set(found) == want
    assert len(want) > 100
    query, base = rows[rows % 3 == 0], rows[rows % 3 != 0]
    found = [
        pair
        for a, b in sig.candidates(query, base, distance, same=False)
        for pair in zip(a.tolist(), b.tolist(), strict=True)
    ]
    q, b = np.meshgrid(query, base, indexing="ij")
    q, b = q.ravel(), b.ravel()
    close = sig.hash_distance(q, b) <= distance
    assert len(found) == len(set(found)) and set(found) == set(
        zip(q[close].tolist(), b[close].tolist(), strict=True)
    )
    # The measures are symmetric.
    d1, r1 = sig.compare(i[:5000], j[:5000], distance)
    d2, r2 = sig.compare(j[:5000], i[:5000], distance)
    assert (d1 == d2).all() and np.allclose(r1, r2, atol=1e-9)


# ----------------------------------------------------------------------------- recall


def planted_study(seed: int = 0, n_photos: int = 40) -> dict:
    """Recall of the near-duplicate test on planted copies, and its false links.

    Digits (all 1,797, 8 x 8) and synthetic photo-like images (64..128 px,
    colour, decoded in grey as with image.mode gray); for each kind a copy of
    every image. Recall: the share of (image, its copy) pairs linked. False
    links: linked pairs among the distinct originals (all pairs checked).
    """
    rng = np.random.default_rng(seed)
    digits = list(digits_images()[0])
    photos = [photo(rng) for _ in range(n_photos)]
    out = {}
    for family, sources in (("digits", digits), ("photos", photos)):
        originals = [reencode(s) for s in sources]
        n = len(originals)
        copies = {kind: [planted_copy(s, kind, rng) for s in sources] for kind in KINDS}
        sig = signatures(originals + [c for kind in KINDS for c in copies[kind]])
        recall = {}
        for k, kind in enumerate(KINDS):
            own = np.arange(n)
            recall[kind] = float(linked(sig, own, own + (k + 1) * n).mean())
        links = near_duplicates.link_components(
            sig, np.arange(n), SETTINGS.near_duplicate_distance, SETTINGS.near_duplicate_correlation
        )
        false_links = int((np.bincount(links.component) > 1).sum())
        out[family] = {"recall": recall, "false_link_components": false_links, "n": n}
    return out


def test_near_duplicate_recall_on_planted_copies():
    study = planted_study()
    for family, result in study.items():
        print(family, result)
        for kind, value in result["recall"].items():
            assert value >= 0.9, (family, kind, value)
        assert result["false_link_components"] == 0, family


def test_distinct_digits_are_never_linked_by_brute_force():
    # All 1.6 million pairs of the demo's digits, without the index.
    sig = signatures([reencode(d) for d in digits_images()[0]])
    i, j = brute_force_links_fast(sig)
    assert len(i) == 0


# ----------------------------------------------------------------------------- the demo, brute force as oracle


def demo_with_planted_copies(n_copies: int = 1200, seed: int = 0) -> list[tuple[dict, np.ndarray]]:
    """The digits plus near copies of some of them (each kind), as stats rows and 16 x 16 arrays."""
    rng = np.random.default_rng(seed)
    images, labels = digits_images()
    rows = []
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        gray = reencode(image)
        rows.append((measured_row(gray, str(label), f"{label}/{k:04d}.png"), gray))
    for c, k in enumerate(rng.choice(len(images), n_copies, replace=False)):
        kind = KINDS[c % len(KINDS)]
        gray = planted_copy(images[k], kind, rng)
        relpath = f"{labels[k]}/{k:04d}_{kind}.png"
        rows.append((measured_row(gray, str(labels[k]), relpath), gray))
    return [(row, cv2.resize(g, (16, 16))[..., None]) for row, g in rows]


def test_linked_pairs_share_role_and_fold_on_demo(tmp_path):
    rows = demo_with_planted_copies()
    stats = clean.read_stats(*write_shards(rows, tmp_path))
    decisions = clean.decide(stats, SETTINGS)
    index = clean.index_table(decisions)
    # The workflow's calls: split (config defaults), then folds of train + val.
    roles = assign_roles(index, 0.2, 0.15, seed=0)
    pool = index.set_index("id").loc[roles.loc[roles["role"] != "test", "id"]].reset_index()
    folds = assign_folds(pool, 5, False, seed=0)

    kept = np.flatnonzero(decisions.kept)
    sig = near_duplicates.Signatures.from_stats(decisions.stats.iloc[kept])
    i, j = brute_force_links_fast(sig)  # ids: kept rows are ids 0..N-1 in order
    assert len(i) > 800  # the 900 kept copies and their originals (7 px copies are too_small)
    role = roles.set_index("id")["role"].to_numpy()
    assert (role[i] == role[j]).all()
    fold = pd.Series(-1, index=index["id"])
    fold[folds["id"].to_numpy()] = folds["fold"].to_numpy()
    assert (fold.to_numpy()[i] == fold.to_numpy()[j]).all()
    # group is exactly the connected components of the brute-force links.
    n = len(index)
    labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)))[1]
    smallest = pd.Series(np.arange(n)).groupby(labels).transform("min").to_numpy()
    assert (index["group"].to_numpy() == smallest).all()
    # Every star member is linked to its leader.
    pairs = set(zip(i.tolist(), j.tolist(), strict=True))
    members = index[index["near_group"] != index["id"]]
    assert all((g, m) in pairs for g, m in zip(members["near_group"], members["id"], strict=True))


# ----------------------------------------------------------------------------- test_leak


def test_test_image_linked_to_any_training_image_is_test_leak(tmp_path):
    rng = np.random.default_rng(5)
    images, labels = digits_images()
    rows = [
        measured_row(reencode(images[k]), str(labels[k]), f"{labels[k]}/{k}.png")
        for k in range(200)
    ]
    # Test copies of training digits (a 7 px copy would be too_small here).
    planted = {5: "jpeg60", 11: "resize_up", 22: "shift", 33: "shift"}
    for k, kind in planted.items():
        copy = planted_copy(images[k], kind, rng)
        pair = signatures([reencode(images[k]), copy])
        assert linked(pair, np.array([0]), np.array([1])).all()  # the test's premise
        rows.append(measured_row(copy, str(labels[k]), f"{labels[k]}/{k}_{kind}.png", "test"))
    # A test image linked only to another test image (not a training one) stays.
    rows.append(measured_row(reencode(images[500]), str(labels[500]), "t/base.png", "test"))
    copy = planted_copy(images[500], "shift", rng)
    rows.append(measured_row(copy, str(labels[500]), "t/copy.png", "test"))
    rows.append(measured_row(reencode(images[600]), str(labels[600]), "t/fresh.png", "test"))
    shards = write_shards([(row, np.zeros((16, 16, 1), np.uint8)) for row in rows], tmp_path)
    decisions = clean.decide(clean.read_stats(*shards), SETTINGS)
    reason = dict(zip(decisions.stats["relpath"], decisions.reason, strict=True))
    detail = dict(zip(decisions.stats["relpath"], decisions.detail, strict=True))
    for k, kind in planted.items():
        name = f"{labels[k]}/{k}_{kind}.png"
        assert reason[name] == "test_leak", name
        assert detail[name].startswith("near duplicate of training image /data/train/"), name
    assert reason["t/base.png"] == reason["t/copy.png"] == reason["t/fresh.png"] == ""
    index = clean.index_table(decisions).set_index("relpath")
    assert index.loc["t/base.png", "group"] == index.loc["t/copy.png", "group"]
    assert clean.summary(decisions, SETTINGS)["leakage"] == {"test_leak": 4}


# ----------------------------------------------------------------------------- reporting


def test_large_components_are_reported_and_logged(tmp_path, caplog):
    rng = np.random.default_rng(8)
    image = texture(rng)
    rows = filler(rng, per_label=40) + [
        stats_row(
            np.clip(image + rng.normal(0, 1.5, image.shape), 0, 255).astype(np.uint8),
            "a",
            f"a/twin{k}.png",
        )
        for k in range(3)
    ]
    stats_paths, image_paths = write_shards(rows, tmp_path / "ingest")
    outputs = {
        name: tmp_path / f"{name}.out" for name in ("index", "rejected", "summary", "examples")
    }
    with caplog.at_level(logging.WARNING, logger="imgpipe"):
        result = clean.clean_shards(stats_paths, image_paths, outputs, SETTINGS)
    near = result["near_duplicates"]
    assert near["components_above_one"] == 1 and near["max_component_size"] == 3
    (big,) = near["large_components"]  # 3 of 83 kept > 1%
    assert big["size"] == 3 and len(big["examples"]) == 3
    assert all(Path(p).name.startswith("twin") for p in big["examples"])
    assert "near-duplicate component of 3 images" in caplog.text
