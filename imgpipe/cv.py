"""K-fold cross-validation: group-aware fold assignment, the summary, and label-issue ranking."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.model_selection import StratifiedGroupKFold

from imgpipe.errors import DataError

log = logging.getLogger(__name__)


def effective_k(labels: pd.Series, k: int, adapt_k: bool) -> int:
    """The number of folds to use: ``k``, or the largest that works when ``adapt_k``.

    Stratified folds need every class to have at least k images; otherwise stop
    with a message naming the classes (or lower k when ``adapt_k``).
    """
    counts = labels.value_counts()
    smallest = int(counts.min())
    if smallest >= k:
        return k
    short = ", ".join(f"{name!r} ({count})" for name, count in counts[counts < k].items())
    if not adapt_k:
        raise DataError(
            f"cv.k={k} is larger than the training images of class(es) {short}; "
            "lower cv.k or set cv.adapt_k: true"
        )
    if smallest < 2:
        raise DataError(f"cross-validation needs at least 2 images per class; {short} has fewer")
    log.warning("cv.k lowered from %d to %d: class(es) %s are smaller", k, smallest, short)
    return smallest


def assign_folds(pool: pd.DataFrame, k: int, adapt_k: bool, seed: int) -> pd.DataFrame:
    """Give each training-pool image (columns id, label, group) a fold in 0..k'-1.

    StratifiedGroupKFold keeps each near-duplicate group inside one fold, so a
    fold's validation images have no near copy in its training images.
    """
    k_used = effective_k(pool["label"], k, adapt_k)
    splitter = StratifiedGroupKFold(n_splits=k_used, shuffle=True, random_state=seed)
    folds = np.full(len(pool), -1, dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(pool, pool["label"], pool["group"])):
        folds[held_out] = fold
    return pd.DataFrame({"id": pool["id"].to_numpy(), "fold": folds})


def fold_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 of one fold."""
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
    }


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


def run_fold(
    fold: int,
    inputs: Mapping[str, str],
    model_cfg: Mapping,
    train_cfg: Mapping,
    best: Mapping,
    oof_path: str,
    summary_path: str,
    gpu_resource: int,
    key: str,
) -> dict:
    """Train on every fold but ``fold``, predict ``fold``: write its out-of-fold probabilities.

    A fold at or beyond the number of folds actually used (``cv.adapt_k``
    lowered k) writes an empty table and a summary marked ``skipped``; the
    fold's model and history (written beside them) are not declared outputs
    for that reason.
    """
    from imgpipe.experiment import (
        load_training_data,
        run_training,
        write_csv,
        write_json,
    )
    from imgpipe.sweep import apply_overrides
    from imgpipe.training import predict_proba

    folds = pd.read_csv(inputs["folds"])
    if fold >= folds["fold"].nunique():
        log.info("fold %d skipped: only %d folds are used", fold, folds["fold"].nunique())
        write_csv(pd.DataFrame(columns=["id", "fold", "label"]), oof_path)
        write_json({"fold": fold, "skipped": True}, summary_path)
        return {"skipped": True}
    sections = apply_overrides({"model": model_cfg, "train": train_cfg}, best.get("overrides", {}))
    data = load_training_data(
        inputs["index"], inputs["split"], inputs["aug_images"], inputs["aug_index"]
    )
    held_out = np.sort(folds.loc[folds["fold"] == fold, "id"].to_numpy())
    train_ids = np.sort(folds.loc[folds["fold"] != fold, "id"].to_numpy())
    out_dir = Path(summary_path).parent
    result = run_training(
        data,
        train_ids,
        held_out,
        sections["model"],
        sections["train"],
        out_dir,
        gpu_resource,
        key,
    )
    probs = predict_proba(out_dir / "model.ckpt", data.images[held_out])
    oof = pd.DataFrame(probs, columns=[f"p{c}" for c in range(probs.shape[1])])
    oof.insert(0, "label", data.labels[held_out])
    oof.insert(0, "fold", fold)
    oof.insert(0, "id", held_out)
    write_csv(oof, oof_path)
    metrics = fold_metrics(data.labels[held_out], probs.argmax(axis=1))
    summary = {**result, **metrics, "fold": fold, "n_train": len(train_ids), "n_val": len(held_out)}
    write_json(summary, summary_path)
    return summary


def summarise_cv(
    index_path: str,
    oof_paths: list[str],
    summary_paths: list[str],
    outputs: Mapping[str, str],
) -> pd.DataFrame:
    """Gather the folds: summary.csv (per fold, mean, std), oof.csv and the suspect labels."""
    import json

    from imgpipe.dataset import class_names, load_images, load_index
    from imgpipe.experiment import write_csv
    from imgpipe.plots import image_grid

    index = load_index(index_path)
    names = class_names(index)
    fold_rows = []
    for path in summary_paths:
        with open(path, encoding="utf-8") as fh:
            summary = json.load(fh)
        if not summary.get("skipped"):
            fold_rows.append({key: summary[key] for key in ("fold", *METRIC_KEYS)})
    table = summarise_folds(pd.DataFrame(fold_rows))
    write_csv(table, outputs["summary"])
    oof = pd.concat([pd.read_csv(path) for path in oof_paths], ignore_index=True)
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
        image_grid([], outputs["suspects_png"])
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


METRIC_KEYS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
