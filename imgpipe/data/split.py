"""Train / val / test roles: stratified by label, seeded, and group-aware (near duplicates stay together)."""

from __future__ import annotations

import logging
import os
import warnings
from fractions import Fraction

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from imgpipe.core.atomic import read_csv
from imgpipe.core.errors import DataError

log = logging.getLogger("imgpipe")

ROLES = ("train", "val", "test")
# The training pool: the images a final model may learn from (everything but the test set).
POOL_ROLES = ("train", "val")


def fold_plan(fraction: float, n_groups: int, largest_class: int) -> tuple[int, int]:
    """Return (folds to take, n_splits) whose ratio best approximates ``fraction``.

    Taking k of n folds gets closer to fractions such as 0.3 (3/10) or 0.05
    (1/20) than one fold of round(1/fraction). n_splits is capped by the
    number of groups and by the largest class, which StratifiedGroupKFold
    requires.
    """
    finest = max(10, round(1 / fraction))
    n_max = int(min(finest, n_groups, largest_class))
    if n_max < 2:
        raise DataError(
            f"cannot hold out a fraction of {fraction}: only {n_groups} independent image "
            f"group(s) and at most {largest_class} image(s) per class remain"
        )
    n = Fraction(fraction).limit_denominator(n_max).denominator
    if n < 2:  # the fraction rounds to 0 or 1: use the finest split allowed
        n = n_max
    return min(max(round(fraction * n), 1), n - 1), n


def tiny_class_groups(labels: pd.Series, groups: pd.Series) -> tuple[set, list]:
    """Groups holding a class that spans fewer than two groups, and those classes."""
    groups_per_class = groups.groupby(labels).nunique()
    tiny = sorted(groups_per_class[groups_per_class < 2].index)
    return set(groups[labels.isin(tiny)]), tiny


def draw_groups(pool: pd.DataFrame, fraction: float, seed: int, what: str) -> np.ndarray:
    """Boolean mask of ``pool`` rows drawn as a held-out ``what`` set of about ``fraction``.

    Classes that span a single group cannot be both trained on and held out:
    they stay out of the draw (so they remain in training).
    """
    held = np.zeros(len(pool), dtype=bool)
    keep_out, tiny = tiny_class_groups(pool["label"], pool["group"])
    if tiny:
        log.info(
            "%s: class(es) %s have a single image group; they stay in training",
            what,
            ", ".join(map(str, tiny)),
        )
    eligible = ~pool["group"].isin(keep_out).to_numpy()
    candidates = pool[eligible]
    if candidates.empty:
        raise DataError(f"no class has two or more independent images to draw a {what} set from")
    k, n = fold_plan(
        fraction, candidates["group"].nunique(), candidates["label"].value_counts().max()
    )
    splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    codes = pd.factorize(candidates["label"], sort=True)[0]
    dummy = np.zeros((len(candidates), 1))
    taken = np.zeros(len(candidates), dtype=bool)
    with warnings.catch_warnings():
        # Classes smaller than n_splits are expected here: they simply miss some folds.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = splitter.split(dummy, codes, groups=candidates["group"].to_numpy())
        for fold, (_, test_idx) in enumerate(folds):
            if fold < k:
                taken[test_idx] = True
    held[np.flatnonzero(eligible)[taken]] = True
    log.info(
        "%s: %d of %d folds taken, %d of %d images (%.1f%%, asked %.1f%%)",
        what,
        k,
        n,
        held.sum(),
        len(pool),
        100 * held.mean(),
        100 * fraction,
    )
    return held


def restore_missing_classes(frame: pd.DataFrame, movable: tuple[str, ...]) -> pd.DataFrame:
    """Move one group back to train for every class left without training images."""
    frame = frame.copy()
    for label in sorted(frame["label"].unique()):
        rows = frame["label"] == label
        if (frame.loc[rows, "role"] == "train").any():
            continue
        for role in movable:
            candidates = frame[rows & (frame["role"] == role)]
            if candidates.empty:
                continue
            smallest = candidates["group"].value_counts().sort_index().idxmin()
            frame.loc[frame["group"] == smallest, "role"] = "train"
            log.warning(
                "class %s had no training image: moved a %s group back to train", label, role
            )
            break
        else:
            log.warning("class %s has no training image at all", label)
    return frame


def test_source_groups(index: pd.DataFrame) -> pd.Series:
    """Rows whose group contains a user-given test image (``source == "test"``)."""
    test_groups = set(index.loc[index["source"] == "test", "group"])
    in_test_group = index["group"].isin(test_groups)
    crossing = in_test_group & (index["source"] != "test")
    if crossing.any():
        log.warning(
            "%d training image(s) share a near-duplicate group with test images: "
            "they join the test role so that no group crosses roles",
            int(crossing.sum()),
        )
    return in_test_group


def assign_roles(
    index_df: pd.DataFrame, test_fraction: float, val_fraction: float, seed: int
) -> pd.DataFrame:
    """Return ``id, role`` (train / val / test) for every row of the clean index.

    Rows with ``source == "test"`` (data.test_root) form the test set;
    otherwise a stratified, group-aware ``test_fraction`` is drawn. Then
    ``val_fraction`` of the rest is drawn the same way. A group never spans
    two roles, and every class keeps at least one training image.
    """
    if index_df.empty:
        raise DataError("the clean index is empty: nothing to split")
    frame = index_df[["id", "label"]].copy()
    frame["label"] = frame["label"].astype(str)
    groups = index_df["group"] if "group" in index_df else index_df["id"]
    frame["group"] = groups.to_numpy()
    source = index_df["source"] if "source" in index_df else pd.Series("train", index_df.index)
    frame["source"] = source.to_numpy()
    frame["role"] = "train"

    if (frame["source"] == "test").any():
        test = test_source_groups(frame).to_numpy()
        log.info("test: %d images from data.test_root (and their groups)", test.sum())
    else:
        test = draw_groups(frame, test_fraction, seed, "test")
    frame.loc[test, "role"] = "test"
    rest = frame[~test]
    if rest.empty:
        raise DataError("no training images remain once the test set is set aside")
    val = draw_groups(rest, val_fraction, seed, "val")
    frame.loc[rest.index[val], "role"] = "val"

    drawn_test = ("test",) if not (frame["source"] == "test").any() else ()
    frame = restore_missing_classes(frame, ("val", *drawn_test))
    log_role_counts(frame)
    return frame[["id", "role"]].sort_values("id").reset_index(drop=True)


def log_role_counts(frame: pd.DataFrame) -> None:
    """Log images per role, and classes missing from a role."""
    table = pd.crosstab(frame["label"], frame["role"]).reindex(columns=list(ROLES), fill_value=0)
    log.info("images per role: %s", table.sum().to_dict())
    for role in ROLES:
        missing = table.index[table[role] == 0].tolist()
        if missing:
            log.warning("class(es) with no %s image: %s", role, ", ".join(map(str, missing)))


def check_test_source(index_df: pd.DataFrame, test_root_set: bool) -> None:
    """Stop when data.test_root is set but no test image survived cleaning."""
    has_test = "source" in index_df and (index_df["source"] == "test").any()
    if test_root_set and not has_test:
        raise DataError(
            "data.test_root is set but no test image survived cleaning "
            "(see results/clean/rejected.csv)"
        )


def load_split(path: str | os.PathLike) -> pd.Series:
    """split.csv as a Series: role (train / val / test) by image id."""
    split = read_csv(path)
    unknown = sorted(set(split["role"]) - set(ROLES))
    if unknown:
        raise ValueError(f"{path}: unknown role(s) {unknown}")
    return split.set_index("id")["role"]


def role_ids(roles: pd.Series, *names: str) -> np.ndarray:
    """Sorted ids of the images whose role is one of ``names``."""
    return np.sort(roles.index[roles.isin(names)].to_numpy(dtype=np.int64))


def final_roles(swept: bool) -> tuple[list[str], list[str]]:
    """(roles trained on, roles validated on) of the final model; evaluate's baselines use the same.

    After a sweep, which chose the settings: the whole training pool (train + val),
    no validation. Without one: train, with val watched (the last epoch is kept).
    """
    return (list(POOL_ROLES), []) if swept else (["train"], ["val"])


def training_pool(index: pd.DataFrame, roles: pd.Series) -> pd.DataFrame:
    """The index rows of the training pool (roles train and val), in id order."""
    return index.set_index("id").loc[role_ids(roles, *POOL_ROLES)].reset_index()


def rows_of_test_set(index: pd.DataFrame, roles: pd.Series) -> pd.DataFrame:
    """The index rows whose role is ``test``, in id order."""
    test_ids = roles.index[roles == "test"]
    rows = index[index["id"].isin(test_ids)].sort_values("id").reset_index(drop=True)
    if rows.empty:
        raise DataError("the split has no test image: nothing to evaluate")
    return rows
