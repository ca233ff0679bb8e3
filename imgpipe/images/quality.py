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
5. near duplicates (see below): test_leak for test images linked to a
   training image, then the links among the rest: ``group`` is their
   connected component (split and folds keep it whole), ``near_group`` the
   star group shown to the user; ``drop`` keeps one image per star;
6. small_class: classes with fewer than min_per_class training images left.

Near duplicates: two images are linked when their thumbnails (stored at
ingest, independent of image.size) are close, at one alignment, by hash
(Hamming distance <= near_duplicate_distance) and by pixels (correlation >=
near_duplicate_correlation, same tone); see imgpipe.images.measure and
Signatures. Every linked pair is found: the hash pairs come from an exact
multi-index-hashing search (no cap per hash) and stream through a union-find,
so a crowd of identical images costs memory in proportion to the images, not
to their pairs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd

from imgpipe.core.atomic import write_csv, write_json
from imgpipe.core.errors import DataError
from imgpipe.core.plots import image_grid
from imgpipe.data.dataset import INDEX_COLUMNS, load_images
from imgpipe.data.ingest import load_stats
from imgpipe.images.near_duplicates import (
    Signatures,
    component_sizes,
    find_test_leaks,
    group_sizes,
    link_components,
    numeric_column,
)

log = logging.getLogger("imgpipe")

REJECTED_COLUMNS = ["path", "relpath", "label", "source", "reason", "detail"]
# A component above this fraction of the kept images is logged and reported.
LARGE_COMPONENT = 0.01


@dataclass(frozen=True)
class CleanSettings:
    """The ``clean:`` config section's decision keys (None switches a threshold off).

    No defaults of its own: config/schema.yaml holds them (``imgpipe.workflow.settings.filled``).
    """

    min_per_class: int
    exact_duplicates: bool
    label_conflicts: bool
    near_duplicates: str
    near_duplicate_distance: int
    near_duplicate_correlation: float
    low_information: float | None
    dark: float | None
    bright: float | None
    blur: float | None
    min_side: int
    max_aspect: float

    @classmethod
    def from_config(cls, section: Mapping) -> CleanSettings:
        """Build from a defaults-filled section; a missing decision key raises (it is a bug)."""
        missing = [f.name for f in fields(cls) if f.name not in section]
        if missing:
            raise KeyError(f"CleanSettings: the section lacks {', '.join(missing)}")
        settings = cls(**{f.name: section[f.name] for f in fields(cls)})
        if settings.near_duplicates not in ("group", "drop", "off"):
            raise ValueError(
                f"near_duplicates must be group, drop or off, not {settings.near_duplicates!r}"
            )
        return settings


# ----------------------------------------------------------------------------- reading


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


def quality_reasons(stats: pd.DataFrame, settings: CleanSettings) -> tuple[np.ndarray, np.ndarray]:
    """Reason and detail per row from its own measurements ('' where every check passes)."""
    n = len(stats)
    reasons = np.full(n, "", dtype=object)
    details = np.full(n, "", dtype=object)
    width, height = numeric_column(stats, "width"), numeric_column(stats, "height")
    short, long_ = np.minimum(width, height), np.maximum(width, height)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = long_ / short
    std, p01, p99, blur = (numeric_column(stats, c) for c in ("std", "p01", "p99", "blur"))
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


# ----------------------------------------------------------------------------- decisions


@dataclass
class Decisions:
    """Per-row outcome of the clean stage (rows in (source, relpath) order)."""

    stats: pd.DataFrame
    reason: np.ndarray  # '' for kept rows
    detail: np.ndarray
    group: np.ndarray  # smallest position of the row's near-duplicate component
    near_group: np.ndarray  # position of the row's star-group leader
    near_stats: dict | None = None  # work done by the near-duplicate search

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


def decide(stats: pd.DataFrame, settings: CleanSettings) -> Decisions:
    """Apply every check to the gathered stats and return the outcome, rows in (source, relpath) order."""
    stats = sort_rows(stats)
    n = len(stats)
    paths = stats["path"].astype(str).to_numpy()
    labels = stats["label"].astype(str).to_numpy()
    is_test = (stats["source"].astype(str) == "test").to_numpy()
    decisions = Decisions(
        stats=stats,
        reason=np.full(n, "", dtype=object),
        detail=np.full(n, "", dtype=object),
        group=np.arange(n, dtype=np.int64),
        near_group=np.arange(n, dtype=np.int64),
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
        _near_checks(decisions, paths, is_test, settings)
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
    decisions: Decisions, paths: np.ndarray, is_test: np.ndarray, settings: CleanSettings
) -> None:
    if "thumb" not in decisions.stats:
        raise DataError("stats.csv has no thumb column: rerun ingest (near duplicates need it)")
    # A row without a thumbnail (not expected for decoded images) matches nothing.
    has_thumb = np.array([":" in str(text) for text in decisions.stats["thumb"]], dtype=bool)
    alive = np.flatnonzero(decisions.kept & has_thumb)
    sig = Signatures.from_stats(decisions.stats.iloc[alive])
    distance, correlation = settings.near_duplicate_distance, settings.near_duplicate_correlation

    def measures(d: int, r: float) -> str:
        return f"hash distance {d}, correlation {r:.4f}"

    local_test = np.flatnonzero(is_test[alive])
    local_train = np.flatnonzero(~is_test[alive])
    leaks = find_test_leaks(sig, local_test, local_train, distance, correlation)
    for test_row, (train_row, d, r) in sorted(leaks.items()):
        detail = f"near duplicate of training image {paths[alive[train_row]]} ({measures(d, r)})"
        _reject(decisions, [alive[test_row]], "test_leak", detail)

    members = np.flatnonzero(decisions.kept[alive])
    links = link_components(sig, members, distance, correlation)
    positions = alive[members]
    decisions.group[positions] = positions[links.component]
    decisions.near_group[positions] = positions[links.leader]
    decisions.near_stats = {
        "candidate_pairs": links.candidate_pairs,
        "correlations_computed": links.correlations_computed,
    }
    if settings.near_duplicates == "drop":
        # Leaders are never linked to each other (a leader takes every
        # untaken row it is linked to), so the kept images are singletons.
        for k in np.flatnonzero(links.leader != np.arange(len(members))):
            lead = positions[links.leader[k]]
            how = measures(links.leader_distance[k], links.leader_correlation[k])
            _reject(
                decisions,
                [positions[k]],
                "near_duplicate",
                f"near duplicate of {paths[lead]} ({how})",
            )
        decisions.group[positions] = positions
        decisions.near_group[positions] = positions


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
    """The survivors with ids 0..N-1 in (source, relpath) order.

    ``group``: smallest id of the row's near-duplicate component (the
    connected component of linked pairs); ``near_group``: smallest id of its
    star group (the leader).
    """
    kept = decisions.stats[decisions.kept].reset_index(drop=True).copy()
    kept.insert(0, "id", np.arange(len(kept), dtype=np.int64))
    ids = pd.Series(kept["id"].to_numpy())
    for name in ("group", "near_group"):
        owner = getattr(decisions, name)[decisions.kept]
        kept[name] = ids.groupby(owner).transform("min").to_numpy()
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
            **group_sizes(index["near_group"].to_numpy()),
            **component_sizes(index["group"].to_numpy()),
            "large_components": large_components(index),
            **(decisions.near_stats or {}),
        },
        "leakage": {"test_leak": int((reasons == "test_leak").sum())},
        "settings": asdict(settings),
    }


def large_components(index: pd.DataFrame, examples: int = 5) -> list[dict]:
    """Components (of 2+ images) above LARGE_COMPONENT of the kept images: group id, size, a few paths."""
    sizes = index.groupby("group").size()
    big = sizes[(sizes > 1) & (sizes > LARGE_COMPONENT * len(index))]
    big = big.sort_values(ascending=False, kind="stable")
    return [
        {
            "group": int(group),
            "size": int(size),
            "examples": index.loc[index["group"] == group, "path"].head(examples).tolist(),
        }
        for group, size in big.items()
    ]


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
    for component in result["near_duplicates"]["large_components"]:
        log.warning(
            "near-duplicate component of %d images (over %g%% of the %d kept, kept together in "
            "split and folds), e.g. %s",
            component["size"],
            100 * LARGE_COMPONENT,
            result["total"]["kept"],
            ", ".join(component["examples"]),
        )
    write_csv(index_table(decisions), outputs["index"])
    write_csv(rejected_table(decisions), outputs["rejected"])
    write_json(result, outputs["summary"])
    examples_figure(decisions, outputs["examples"], examples_per_reason)
    return result
