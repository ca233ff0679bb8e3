"""K-fold cross-validation: group-aware fold assignment, the summary, and label-issue ranking."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from imgpipe.core.atomic import read_csv, write_csv
from imgpipe.core.errors import DataError

log = logging.getLogger(__name__)


def effective_k(labels: pd.Series, k: int, adapt_k: bool, groups: pd.Series | None = None) -> int:
    """The number of folds to use: ``k``, or the largest that works when ``adapt_k``.

    A fold holds whole near-duplicate groups, so stratified folds need every
    class to span at least k independent groups (``groups``; each image its own
    group when None); otherwise stop with a message naming the classes (or
    lower k when ``adapt_k``).
    """
    groups = pd.Series(np.arange(len(labels)), index=labels.index) if groups is None else groups
    table = pd.DataFrame({"label": labels.to_numpy(), "group": groups.to_numpy()})
    counts = table.groupby("label", sort=True)["group"].nunique()
    images = table["label"].value_counts()
    smallest = int(counts.min())
    if smallest >= k:
        return k
    short = ", ".join(
        f"{name!r} ({count})"
        if count == images[name]
        else f"{name!r} ({count} groups of {images[name]} images)"
        for name, count in counts[counts < k].items()
    )
    if not adapt_k:
        raise DataError(
            f"cv.k={k} is larger than the training images of class(es) {short}, counted in "
            "near-duplicate groups (a fold holds whole groups); lower cv.k or set cv.adapt_k: true"
        )
    if smallest < 2:
        raise DataError(
            "cross-validation needs at least 2 independent images (near-duplicate groups) "
            f"per class; {short} has fewer"
        )
    log.warning("cv.k lowered from %d to %d: class(es) %s have fewer groups", k, smallest, short)
    return smallest


# The fold of images that are never held out (a class that is one single group).
ALWAYS_TRAIN = -1


def assign_folds(pool: pd.DataFrame, k: int, adapt_k: bool, seed: int) -> pd.DataFrame:
    """Give each training-pool image (columns id, label, group) a fold in 0..k'-1.

    StratifiedGroupKFold keeps each near-duplicate group inside one fold, so a
    fold's held-out images have no near copy in its training images. A class
    whose images form one single group cannot be both trained on and held out:
    as in the split, it stays in training (fold ALWAYS_TRAIN = -1), never
    scored and never ranked as suspect labels.
    """
    from imgpipe.data.split import tiny_class_groups

    keep_out, tiny = tiny_class_groups(pool["label"].astype(str), pool["group"])
    if tiny:
        log.info(
            "cv: class(es) %s are a single image group: they always train, never held out",
            ", ".join(map(str, tiny)),
        )
    folds = np.full(len(pool), ALWAYS_TRAIN, dtype=np.int64)
    eligible = ~pool["group"].isin(keep_out).to_numpy()
    candidates = pool[eligible]
    if candidates.empty:
        raise DataError("cross-validation needs a class with at least two independent images")
    k_used = effective_k(candidates["label"], k, adapt_k, candidates["group"])
    positions = np.flatnonzero(eligible)
    for fold, held_out in enumerate(held_out_folds(candidates, k_used, seed)):
        folds[positions[held_out]] = fold
    return pd.DataFrame({"id": pool["id"].to_numpy(), "fold": folds})


def held_out_folds(candidates: pd.DataFrame, k: int, seed: int) -> list[np.ndarray]:
    """Row positions held out by each fold of StratifiedGroupKFold(k) that holds any: fold 0..n-1.

    StratifiedGroupKFold can leave a fold empty (its greedy placement breaks
    near-ties by float rounding). Skipping it numbers the folds that hold
    images 0..n-1, so the fold jobs 0..n-1 each score images, the jobs n..k-1
    are skipped (``folds_used``), and every image is scored once.
    """
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    split = splitter.split(candidates, candidates["label"], candidates["group"])
    held_outs = [held_out for _, held_out in split if len(held_out)]
    if len(held_outs) < k:
        log.warning(
            "cv: %d of the %d folds came out empty; using %d folds",
            k - len(held_outs),
            k,
            len(held_outs),
        )
    if len(held_outs) < 2:
        raise DataError("cross-validation needs at least 2 non-empty folds; lower cv.k")
    return held_outs


def folds_used(folds: pd.DataFrame) -> int:
    """How many folds folds.csv holds (the always-training images are in none)."""
    return int(folds.loc[folds["fold"] >= 0, "fold"].nunique())


def fold_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro precision / recall / F1 of one fold's held-out images.

    Macro averages run over the classes the fold holds out (see
    ``imgpipe.stages.evaluate.headline_metrics``).
    """
    from imgpipe.learn.metrics import headline_metrics

    return headline_metrics(y_true, y_pred)


def summarise_folds(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Per-fold rows followed by ``mean`` and ``std`` rows (sample std over folds)."""
    metrics = per_fold.drop(columns=["fold"])
    mean = metrics.mean().to_frame().T.assign(fold="mean")
    std = metrics.std(ddof=1).fillna(0.0).to_frame().T.assign(fold="std")
    table = pd.concat([per_fold.assign(fold=per_fold["fold"].astype(str)), mean, std])
    return table[["fold", *metrics.columns]].reset_index(drop=True)


def suspect_labels(
    labels: np.ndarray, probs: np.ndarray, class_names: list[str], paths: np.ndarray
) -> pd.DataFrame:
    """Rank images whose given label is most likely wrong (cleanlab's confident learning).

    ``probs`` are out-of-fold class probabilities. ``score`` is cleanlab's label
    quality (self-confidence): low means likely mislabelled; rows come worst first.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if len(labels) == 0:
        return pd.DataFrame(columns=["path", "given_label", "suggested_label", "score"])
    issues = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    scores = get_label_quality_scores(labels, probs, method="self_confidence")
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame(
        {
            "row": issues,
            "path": paths[issues],
            "given_label": names[labels[issues]],
            "suggested_label": names[probs[issues].argmax(axis=1)],
            "score": scores[issues],
        }
    )


def summarise_cv(
    index_path: str,
    oof_paths: list[str],
    summary_paths: list[str],
    outputs: Mapping[str, str],
) -> pd.DataFrame:
    """Gather the folds: summary.csv (per fold, mean, std), oof.csv and the suspect labels.

    summary.csv has the model's metrics and, beside them, each fold's
    baselines (``baseline_majority_accuracy``, ... ``baseline_linear_f1_macro``)
    and its calibration on the held-out fold (``ece_before``, ``ece_after``,
    ``nll_before``, ``nll_after``).
    """
    import json

    from imgpipe.core.plots import image_grid
    from imgpipe.data.dataset import class_names, load_images, load_index
    from imgpipe.learn.baseline_warning import flat_baselines

    index = load_index(index_path)
    names = class_names(index)
    fold_rows = []
    for path in summary_paths:
        with open(path, encoding="utf-8") as fh:
            summary = json.load(fh)
        if not summary.get("skipped"):
            row = {key: summary[key] for key in ("fold", *METRIC_KEYS)}
            if "baselines" in summary:  # the majority class and the linear model on pixels
                row |= flat_baselines(summary["baselines"])
            calibration = summary.get("calibration") or {}
            row |= {key: calibration[key] for key in CALIBRATION_KEYS if key in calibration}
            fold_rows.append(row)
    table = summarise_folds(pd.DataFrame(fold_rows))
    write_csv(table, outputs["summary"])
    oof = pd.concat([read_csv(path) for path in oof_paths], ignore_index=True)
    oof = oof.dropna(axis=1, how="all").sort_values("id").reset_index(drop=True)
    write_csv(oof, outputs["oof"])
    probs = oof[[f"p{c}" for c in range(len(names))]].to_numpy()
    labels = oof["label"].to_numpy(dtype=np.int64)
    by_id = index.set_index("id")
    suspects = suspect_labels(labels, probs, names, by_id.loc[oof["id"], "path"].to_numpy())
    suspects.insert(0, "id", oof["id"].to_numpy()[suspects.pop("row").to_numpy()])
    write_csv(suspects, outputs["suspects"])
    shown = suspects.head(24)
    if shown.empty:  # a good model on clean labels flags nothing
        image_grid([], outputs["suspects_png"], empty_text="no suspect label")
        log.info("cv: %s; no suspect labels", table.to_dict("records"))
        return table
    images = load_images(index.set_index("id").loc[shown["id"]].reset_index())
    titles = [
        f"{given}->{sug} {score:.2f}"
        for given, sug, score in shown[["given_label", "suggested_label", "score"]].itertuples(
            index=False
        )
    ]
    rows = [list(images[i : i + 8]) for i in range(0, len(images), 8)]
    cell_titles = [titles[i : i + 8] for i in range(0, len(titles), 8)]
    image_grid(rows, outputs["suspects_png"], cell_titles=cell_titles)
    log.info("cv: %s", table.to_dict("records"))
    return table


# The held-out fold's expected calibration error and NLL before (T = 1) and after its temperature.
CALIBRATION_KEYS = ("ece_before", "ece_after", "nll_before", "nll_after")
METRIC_KEYS = ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro")
