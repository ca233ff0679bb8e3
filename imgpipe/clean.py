"""The clean stage: decide which ingested images to keep, from the per-shard measurements.

Every decision works on the gathered stats tables of all shards (so duplicates
between shards are found) and records one reason and a human detail per
rejected image. Order of the checks (the first that applies wins):

1. ingest / listing rejections pass through;
2. too_small, odd_aspect, too_dark, too_bright, low_information, blurry
   (the measurements of each image alone);
3. label_conflict: the same pixels under two labels, every copy rejected;
4. exact_duplicate (keep the first by source, relpath) and test_leak (a test
   image with the pixels of a training image);
5. near duplicates by pHash + pixel difference: test_leak for test images
   close to a training image, then leader clustering (group / drop / off);
6. small_class: classes with fewer than min_per_class training images left.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd

from imgpipe.atomic import write_csv, write_json
from imgpipe.dataset import INDEX_COLUMNS, load_images
from imgpipe.errors import DataError
from imgpipe.ingest import load_stats
from imgpipe.plots import image_grid
from imgpipe.stage import StageJob

log = logging.getLogger("imgpipe")

REJECTED_COLUMNS = ["path", "relpath", "label", "source", "reason", "detail"]
# Pairs whose pixels are compared at once (bounds memory on huge candidate sets).
_PAIR_CHUNK = 8192
# Earlier rows of a hash bucket each row is compared with (see hash_pairs).
MAX_CANDIDATES = 256


@dataclass(frozen=True)
class CleanSettings:
    """The ``clean:`` config section's decision keys (None switches a threshold off)."""

    min_per_class: int = 2
    exact_duplicates: bool = True
    label_conflicts: bool = True
    near_duplicates: str = "group"
    near_duplicate_distance: int = 4
    near_duplicate_pixel_diff: float = 8.0
    low_information: float | None = 2.0
    dark: float | None = 20
    bright: float | None = 235
    blur: float | None = 0.25
    min_side: int = 8
    max_aspect: float = 10.0

    @classmethod
    def from_config(cls, section: Mapping) -> CleanSettings:
        """Build from a config mapping, ignoring keys that are not decisions (shards, ...)."""
        names = {f.name for f in fields(cls)}
        settings = cls(**{k: v for k, v in section.items() if k in names})
        if settings.near_duplicates not in ("group", "drop", "off"):
            raise ValueError(
                f"near_duplicates must be group, drop or off, not {settings.near_duplicates!r}"
            )
        return settings


# ----------------------------------------------------------------------------- reading


def parse_hashes(values: Sequence) -> np.ndarray:
    """Turn 64-bit hashes written as hex text (16 digits, or 0x...) or integers into uint64."""
    out = np.zeros(len(values), dtype=np.uint64)
    for k, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
            continue
        if isinstance(value, str):
            text = value.strip().lower()
            number = int(text, 16) if len(text) == 16 or text.startswith("0x") else int(text)
        else:
            number = int(value)
        out[k] = np.uint64(number & 0xFFFFFFFFFFFFFFFF)
    return out


def read_stats(
    stats_paths: Sequence[str | os.PathLike], image_paths: Sequence[str | os.PathLike]
) -> pd.DataFrame:
    """Gather the shards' stats tables, add ``shard`` and ``array``, sort by (source, relpath)."""
    if len(stats_paths) != len(image_paths):
        raise ValueError("one images.npy per stats.csv expected")
    frames = []
    for shard, (stats_path, array_path) in enumerate(zip(stats_paths, image_paths, strict=True)):
        frame = load_stats(stats_path)
        frame["shard"] = shard
        frame["array"] = str(array_path)
        frames.append(frame)
    return sort_rows(pd.concat(frames, ignore_index=True))


def sort_rows(stats: pd.DataFrame) -> pd.DataFrame:
    """Order rows by (source, relpath, path): the order ids and 'first copy' follow."""
    return stats.sort_values(["source", "relpath", "path"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- per-image checks


def _numeric(stats: pd.DataFrame, column: str) -> np.ndarray:
    return pd.to_numeric(stats[column], errors="coerce").astype("float64").to_numpy()


def quality_reasons(stats: pd.DataFrame, settings: CleanSettings) -> tuple[np.ndarray, np.ndarray]:
    """Reason and detail per row from its own measurements ('' where every check passes)."""
    n = len(stats)
    reasons = np.full(n, "", dtype=object)
    details = np.full(n, "", dtype=object)
    width, height = _numeric(stats, "width"), _numeric(stats, "height")
    short, long_ = np.minimum(width, height), np.maximum(width, height)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = long_ / short
    std, p01, p99, blur = (_numeric(stats, c) for c in ("std", "p01", "p99", "blur"))
    checks: list[tuple[str, np.ndarray, Callable[[int], str]]] = [
        (
            "too_small",
            short < settings.min_side,
            lambda i: f"min side {short[i]:g} < {settings.min_side}",
        ),
        (
            "odd_aspect",
            aspect > settings.max_aspect,
            lambda i: f"aspect {aspect[i]:.3g} > {settings.max_aspect:g}",
        ),
    ]
    # Dark / bright: 99% of the pixels lie in the dark (bright) band AND the
    # spread is no more than pixels confined to that band can have (std <= band
    # width / 2). A thin bright line on black or dark ink on white has 1% of
    # pixels or less outside the band but raises the spread above that bound.
    if settings.dark is not None:
        t_dark = settings.dark
        dark = (p99 < t_dark) & (std <= p99 / 2)
        checks.append(
            (
                "too_dark",
                dark,
                lambda i: f"p99 {p99[i]:g} < {t_dark:g}, std {std[i]:.3g} <= {p99[i] / 2:g}",
            )
        )
    if settings.bright is not None:
        t_bright = settings.bright
        bright = (p01 > t_bright) & (std <= (255 - p01) / 2)
        checks.append(
            (
                "too_bright",
                bright,
                lambda i: (
                    f"p01 {p01[i]:g} > {t_bright:g}, std {std[i]:.3g} <= {(255 - p01[i]) / 2:g}"
                ),
            )
        )
    # After dark/bright: a black or white blank says too_dark / too_bright.
    if settings.low_information is not None:
        t = settings.low_information
        checks.append(("low_information", std < t, lambda i: f"std {std[i]:.3g} < {t:g}"))
    if settings.blur is not None:
        t_blur = settings.blur
        checks.append(("blurry", blur < t_blur, lambda i: f"blur {blur[i]:.3g} < {t_blur:g}"))
    for reason, hit, describe in checks:
        for i in np.flatnonzero(hit & (reasons == "")):
            reasons[i], details[i] = reason, describe(i)
    return reasons, details


# ----------------------------------------------------------------------------- exact duplicates


def label_conflicts(pixel_hash: np.ndarray, labels: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Boolean mask of alive rows whose pixels also appear, alive, under another label."""
    frame = pd.DataFrame({"h": pixel_hash[alive], "label": labels[alive]})
    n_labels = frame.groupby("h")["label"].transform("nunique").to_numpy()
    out = np.zeros(len(alive), dtype=bool)
    out[np.flatnonzero(alive)] = n_labels > 1
    return out


def first_copies(pixel_hash: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """For each alive row, the position of the first alive row with the same pixels (-1 elsewhere)."""
    positions = np.flatnonzero(alive)
    frame = pd.DataFrame({"h": pixel_hash[positions], "pos": positions})
    first = np.full(len(alive), -1, dtype=np.int64)
    first[positions] = frame.groupby("h")["pos"].transform("min").to_numpy()
    return first


# ----------------------------------------------------------------------------- near duplicates


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """Split 64 bits into max_distance + 1 contiguous (shift, width) bands.

    Pigeonhole: two hashes within max_distance bits differ in at most
    max_distance bands, so they agree exactly on at least one.
    """
    count = min(max_distance + 1, 64)
    edges = np.linspace(0, 64, count + 1).round().astype(int)
    return [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def hash_pairs(
    hashes: np.ndarray, max_distance: int, max_candidates: int = MAX_CANDIDATES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) whose 64-bit hashes differ in at most ``max_distance`` bits.

    Only hashes that agree on one band are compared (vectorised over each
    band's sorted keys), so the work grows with the number of near pairs, not
    with N squared. Each row is compared with at most ``max_candidates``
    earlier rows of its band bucket: that only bites on a crowd of
    near-identical images (video frames), whose k^2 / 2 pairs would not fit
    in memory; they then form groups of up to max_candidates + 1 instead of
    one. Returns (i, j, distance).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    found_i, found_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for shift, width in _bands(max_distance):
        key = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")  # equal keys stay in row order
        sorted_key = key[order]
        # Rows with equal keys are adjacent once sorted: pair each row with the
        # one `offset` places later, for growing offsets, until no bucket is
        # that long.
        for offset in range(1, min(len(order), max_candidates + 1)):
            same = np.flatnonzero(sorted_key[offset:] == sorted_key[:-offset])
            if same.size == 0:
                break
            a, b = order[same], order[same + offset]
            close = np.bitwise_count(hashes[a] ^ hashes[b]) <= max_distance
            found_i.append(a[close])
            found_j.append(b[close])
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    n = max(len(hashes), 1)
    unique = np.unique(i * n + j)
    i, j = unique // n, unique % n
    distance = np.bitwise_count(hashes[i] ^ hashes[j]).astype(np.int64)
    return i, j, distance


def pixel_differences(
    images: Callable[[np.ndarray], np.ndarray], i: np.ndarray, j: np.ndarray
) -> np.ndarray:
    """Mean absolute difference (0-255) between the resized arrays of each pair (i, j).

    ``images(rows)`` returns the arrays of the given rows. Pairs are taken in
    chunks and only the rows of a chunk are loaded, so memory stays bounded.
    """
    out = np.empty(len(i), dtype=np.float64)
    for start in range(0, len(i), _PAIR_CHUNK):
        chunk = slice(start, start + _PAIR_CHUNK)
        rows, inverse = np.unique(np.concatenate([i[chunk], j[chunk]]), return_inverse=True)
        arrays = images(rows).astype(np.int16)
        half = len(inverse) // 2
        diff = np.abs(arrays[inverse[:half]] - arrays[inverse[half:]])
        out[chunk] = diff.reshape(half, -1).mean(axis=1)
    return out


def leader_groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Greedy star clustering: group id (the leader's position) per row, in row order.

    Walking rows in order, a row not yet taken leads a new group and takes
    every untaken row it matches. Members match their leader directly, so
    chains A~B~C~... never merge into one big component.
    """
    group = np.arange(n, dtype=np.int64)
    if len(i) == 0:
        return group
    a, b = np.concatenate([i, j]), np.concatenate([j, i])
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    starts = np.searchsorted(a, np.arange(n + 1))
    taken = np.zeros(n, dtype=bool)
    for row in np.unique(a):  # rows without any match stay their own group
        if taken[row]:
            continue
        taken[row] = True
        partners = b[starts[row] : starts[row + 1]]
        partners = partners[~taken[partners]]
        group[partners] = row
        taken[partners] = True
    return group


def group_sizes(group: np.ndarray) -> dict[str, int]:
    """Near-duplicate group statistics: number of groups, groups above one image, largest."""
    if len(group) == 0:
        return {
            "groups": 0,
            "groups_above_one": 0,
            "images_in_groups_above_one": 0,
            "max_group_size": 0,
        }
    counts = np.unique(group, return_counts=True)[1]
    return {
        "groups": int(len(counts)),
        "groups_above_one": int((counts > 1).sum()),
        "images_in_groups_above_one": int(counts[counts > 1].sum()),
        "max_group_size": int(counts.max()),
    }


# ----------------------------------------------------------------------------- decisions


@dataclass
class Decisions:
    """Per-row outcome of the clean stage (rows in (source, relpath) order)."""

    stats: pd.DataFrame
    reason: np.ndarray  # '' for kept rows
    detail: np.ndarray
    group: np.ndarray  # leader position for kept rows

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask of kept rows."""
        return self.reason == ""


def _reject(
    decisions: Decisions, rows: np.ndarray, reason: str, details: Sequence[str] | str
) -> None:
    rows = np.asarray(rows, dtype=np.int64)
    decisions.reason[rows] = reason
    decisions.detail[rows] = (
        details if isinstance(details, str) else np.asarray(details, dtype=object)
    )


def decide(
    stats: pd.DataFrame,
    settings: CleanSettings,
    images: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Decisions:
    """Apply every check to the gathered stats and return the outcome, rows in (source, relpath) order.

    ``images(rows)`` loads the resized arrays of the given row positions (of
    the sorted table); it is called only for near-duplicate candidate pairs
    (default: the rows' ``array`` memmaps).
    """
    stats = sort_rows(stats)
    if images is None:
        images = lambda rows: load_images(stats.iloc[rows])  # noqa: E731
    n = len(stats)
    paths = stats["path"].astype(str).to_numpy()
    labels = stats["label"].astype(str).to_numpy()
    is_test = (stats["source"].astype(str) == "test").to_numpy()
    decisions = Decisions(
        stats=stats,
        reason=np.full(n, "", dtype=object),
        detail=np.full(n, "", dtype=object),
        group=np.arange(n, dtype=np.int64),
    )

    ingest_rejected = (stats["status"].astype(str) == "rejected").to_numpy()
    decisions.reason[ingest_rejected] = stats["reason"].astype(str).to_numpy()[ingest_rejected]
    decisions.detail[ingest_rejected] = stats["detail"].astype(str).to_numpy()[ingest_rejected]
    decisions.reason[ingest_rejected & (decisions.reason == "")] = "unreadable"

    quality, quality_detail = quality_reasons(stats, settings)
    hit = decisions.kept & (quality != "")
    decisions.reason[hit], decisions.detail[hit] = quality[hit], quality_detail[hit]

    pixel_hash = stats["pixel_hash"].astype(str).to_numpy().astype(object)
    # A row without a hash (not expected for decoded images) matches nothing.
    missing = np.flatnonzero(pixel_hash == "")
    pixel_hash[missing] = [f"missing:{row}" for row in missing]
    _exact_checks(decisions, pixel_hash, labels, paths, is_test, settings)
    if settings.near_duplicates != "off":
        _near_checks(decisions, images, paths, is_test, settings)
    _small_classes(decisions, labels, is_test, settings)
    return decisions


def _exact_checks(
    decisions: Decisions,
    pixel_hash: np.ndarray,
    labels: np.ndarray,
    paths: np.ndarray,
    is_test: np.ndarray,
    settings: CleanSettings,
) -> None:
    if settings.label_conflicts:
        conflict = np.flatnonzero(label_conflicts(pixel_hash, labels, decisions.kept))
        # Per pixel hash, the first row of each label (rows are in path order).
        firsts: dict[str, dict[str, int]] = {}
        for row in conflict:
            firsts.setdefault(pixel_hash[row], {}).setdefault(labels[row], row)
        for row in conflict:
            other = next(r for label, r in firsts[pixel_hash[row]].items() if label != labels[row])
            _reject(
                decisions,
                [row],
                "label_conflict",
                f"same pixels as {paths[other]} labelled {labels[other]!r}",
            )
    # A test image with the pixels of a training image leaks: always checked.
    train_first = first_copies(pixel_hash, decisions.kept & ~is_test)
    first_by_hash = dict(
        zip(pixel_hash[train_first >= 0], train_first[train_first >= 0], strict=True)
    )
    for row in np.flatnonzero(decisions.kept & is_test):
        source_row = first_by_hash.get(pixel_hash[row])
        if source_row is not None:
            _reject(
                decisions, [row], "test_leak", f"same pixels as training image {paths[source_row]}"
            )
    if settings.exact_duplicates:
        first = first_copies(pixel_hash, decisions.kept)
        copies = np.flatnonzero(decisions.kept & (first >= 0) & (first != np.arange(len(first))))
        _reject(
            decisions,
            copies,
            "exact_duplicate",
            [f"duplicate of {paths[first[r]]}" for r in copies],
        )


def _near_checks(
    decisions: Decisions,
    images: Callable[[np.ndarray], np.ndarray],
    paths: np.ndarray,
    is_test: np.ndarray,
    settings: CleanSettings,
) -> None:
    phash_text = decisions.stats["phash"].astype(str).to_numpy()
    alive = np.flatnonzero(decisions.kept & (phash_text != ""))
    hashes = parse_hashes(phash_text[alive])
    i, j, distance = hash_pairs(hashes, settings.near_duplicate_distance)
    diff = pixel_differences(lambda rows: images(alive[rows]), i, j)
    close = diff <= settings.near_duplicate_pixel_diff
    i, j, distance, diff = alive[i[close]], alive[j[close]], distance[close], diff[close]

    def describe(k: int, other: int, what: str = "") -> str:
        measures = f"hamming {distance[k]}, pixel diff {diff[k]:.2g}"
        return f"near duplicate of {what}{paths[other]} ({measures})"

    leak = is_test[i] != is_test[j]
    for k in np.flatnonzero(leak):
        test_row, train_row = (i[k], j[k]) if is_test[i[k]] else (j[k], i[k])
        if decisions.reason[test_row] == "":
            _reject(decisions, [test_row], "test_leak", describe(k, train_row, "training image "))

    positions = np.flatnonzero(decisions.kept)
    local = np.full(len(decisions.reason), -1, dtype=np.int64)
    local[positions] = np.arange(len(positions))
    usable = ~leak & decisions.kept[i] & decisions.kept[j]
    leader = positions[leader_groups(len(positions), local[i[usable]], local[j[usable]])]
    decisions.group[positions] = leader
    if settings.near_duplicates == "drop":
        pair_of = {(int(a), int(b)): k for k, (a, b) in enumerate(zip(i, j, strict=True))}
        for row in positions[leader != positions]:
            lead = leader[local[row]]
            k = pair_of[(min(lead, row), max(lead, row))]
            _reject(decisions, [row], "near_duplicate", describe(k, lead))
            decisions.group[row] = row


def _small_classes(
    decisions: Decisions, labels: np.ndarray, is_test: np.ndarray, settings: CleanSettings
) -> None:
    counts = pd.Series(labels[decisions.kept & ~is_test]).value_counts()
    for label in sorted(set(labels[decisions.kept])):
        count = int(counts.get(label, 0))
        if count < settings.min_per_class:
            rows = np.flatnonzero(decisions.kept & (labels == label))
            detail = f"class {label!r} keeps {count} training image(s) < min_per_class {settings.min_per_class}"
            _reject(decisions, rows, "small_class", detail)


def check_trainable(decisions: Decisions) -> None:
    """Raise DataError when nothing survives or fewer than two classes do."""
    stats, kept = decisions.stats, decisions.kept
    if not kept.any():
        counts = pd.Series(decisions.reason).value_counts()
        why = ", ".join(f"{reason} {count}" for reason, count in counts.items())
        raise DataError(
            f"no image survived cleaning ({len(stats)} listed; rejected: {why or 'none listed'})"
        )
    training = kept & (stats["source"].astype(str) != "test").to_numpy()
    classes = sorted(set(stats["label"].astype(str).to_numpy()[training]))
    if len(classes) < 2:
        raise DataError(
            f"only 1 class ({classes[0]!r}) survived cleaning; training needs at least two "
            "(see results/clean/rejected.csv)"
        )


# ----------------------------------------------------------------------------- outputs


def index_table(decisions: Decisions) -> pd.DataFrame:
    """The survivors with ids 0..N-1 in (source, relpath) order; group = smallest id of its group."""
    kept = decisions.stats[decisions.kept].reset_index(drop=True).copy()
    kept.insert(0, "id", np.arange(len(kept), dtype=np.int64))
    leaders = decisions.group[decisions.kept]
    kept["group"] = pd.Series(kept["id"].to_numpy()).groupby(leaders).transform("min").to_numpy()
    for name in ("shard", "row"):
        kept[name] = kept[name].astype(np.int64)
    return kept[INDEX_COLUMNS]


def rejected_table(decisions: Decisions) -> pd.DataFrame:
    """The rejected rows with reason and detail, in (source, relpath) order."""
    mask = ~decisions.kept
    table = decisions.stats.loc[mask, ["path", "relpath", "label", "source"]].copy()
    table["reason"], table["detail"] = decisions.reason[mask], decisions.detail[mask]
    return table.reset_index(drop=True)


def summary(decisions: Decisions, settings: CleanSettings) -> dict:
    """Counts per class kept, per reason and per class rejected, totals, group sizes, leakage, settings."""
    stats, kept = decisions.stats, decisions.kept
    labels = stats["label"].astype(str).to_numpy()
    reasons = decisions.reason[~kept]

    def counts(values: np.ndarray) -> dict[str, int]:
        return {str(k): int(v) for k, v in sorted(pd.Series(values).value_counts().items())}

    index = index_table(decisions)
    return {
        "total": {"listed": len(stats), "kept": int(kept.sum()), "rejected": int((~kept).sum())},
        "kept_per_class": counts(labels[kept]),
        "kept_per_source": counts(stats["source"].astype(str).to_numpy()[kept]),
        "rejected_per_reason": counts(reasons),
        "rejected_per_class": counts(labels[~kept]),
        "near_duplicates": {
            "mode": settings.near_duplicates,
            **group_sizes(index["group"].to_numpy()),
        },
        "leakage": {"test_leak": int((reasons == "test_leak").sum())},
        "settings": asdict(settings),
    }


def examples_figure(decisions: Decisions, path: str | os.PathLike, per_reason: int = 8) -> None:
    """Save a PNG grid of rejected images, one row per reason with pixels (decode failures have none)."""
    ingest_rejected = (decisions.stats["status"].astype(str) == "rejected").to_numpy()
    shown = ~decisions.kept & ~ingest_rejected
    rows, titles = [], []
    for reason in sorted(set(decisions.reason[shown])):
        members = np.flatnonzero(shown & (decisions.reason == reason))
        rows.append(list(load_images(decisions.stats.iloc[members[:per_reason]])))
        titles.append(f"{reason}\n{len(members)} image(s)")
    image_grid(rows, path, row_titles=titles, empty_text="no image rejected by the clean checks")


def run_clean(job: StageJob) -> dict:
    """The clean stage: decide on every listed file of every shard; write index, rejections, summary."""
    settings = CleanSettings.from_config(job.params["clean"])
    result = clean_shards(
        job.input["stats"],
        job.input["images"],
        job.output,
        settings,
        job.params["examples_per_reason"],
    )
    log.info("clean: %s", result["total"])
    log.info("rejected per reason: %s", result["rejected_per_reason"])
    log.info("near duplicates: %s", result["near_duplicates"])
    return result


def clean_shards(
    stats_paths: Sequence[str | os.PathLike],
    image_paths: Sequence[str | os.PathLike],
    outputs: Mapping[str, str | os.PathLike],
    settings: CleanSettings,
    examples_per_reason: int = 8,
) -> dict:
    """Read the shards, decide, write index / rejected / summary / examples; return the summary.

    ``outputs`` maps index, rejected, summary and examples to paths. A
    DataError stops the stage before anything is written when nothing, or a
    single class, survives.
    """
    stats = read_stats(stats_paths, image_paths)
    decisions = decide(stats, settings)
    check_trainable(decisions)
    result = summary(decisions, settings)
    write_csv(index_table(decisions), outputs["index"])
    write_csv(rejected_table(decisions), outputs["rejected"])
    write_json(result, outputs["summary"])
    examples_figure(decisions, outputs["examples"], examples_per_reason)
    return result
