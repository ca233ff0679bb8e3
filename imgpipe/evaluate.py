"""Test-set evaluation of the final model: metrics, confusion matrix, predictions and plots."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.atomic import write_csv, write_json
from imgpipe.errors import DataError
from imgpipe.metrics import classification_metrics, confusion_matrix_table, per_class_table
from imgpipe.plots import pyplot, save_figure
from imgpipe.stage import StageJob

log = logging.getLogger("imgpipe")

# Above this many classes the confusion matrix cells are not annotated with counts.
ANNOTATE_MAX_CLASSES = 25


# ----------------------------------------------------------------- metrics


def predictions_table(
    test_rows: pd.DataFrame, probs: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """``id, path, label, predicted, confidence`` for the test rows and their probabilities."""
    names = np.asarray(class_names)
    return pd.DataFrame(
        {
            "id": test_rows["id"].to_numpy(),
            "path": test_rows["path"].to_numpy(),
            "label": test_rows["label"].astype(str).to_numpy(),
            "predicted": names[probs.argmax(axis=1)],
            "confidence": probs.max(axis=1),
        }
    )


# ----------------------------------------------------------------- plots


def plot_confusion(cm_df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Save the confusion matrix as a heatmap coloured by row share (recall), with the counts."""
    plt = pyplot()
    counts = cm_df.to_numpy()
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, float), where=totals > 0)
    k = len(cm_df)
    side = min(max(4.0, 0.45 * k + 2.0), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k), labels=[str(c) for c in cm_df.columns], rotation=90)
    ax.set_yticks(range(k), labels=[str(c) for c in cm_df.index])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= ANNOTATE_MAX_CLASSES:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                colour = "white" if shares[i, j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    ax.set_title(f"confusion matrix ({int(counts.sum())} test images)")
    save_figure(fig, path)


def epoch_metrics(history: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch of a Lightning CSVLogger metrics table (sparse rows; NaNs skipped).

    Step-level columns are averaged over the epoch; a ``<name>_epoch`` column
    replaces its ``<name>_step`` twin and is renamed ``<name>``.
    """
    if history.empty or "epoch" not in history:
        return pd.DataFrame()
    frame = history.copy()
    # LearningRateMonitor rows carry no epoch: they precede the epoch they belong to.
    frame["epoch"] = frame["epoch"].bfill()
    frame = frame.dropna(subset=["epoch"])
    numeric = frame.select_dtypes("number").drop(columns=["step", "attempt"], errors="ignore")
    per_epoch = numeric.groupby("epoch", sort=True).mean()
    for name in [c[: -len("_epoch")] for c in per_epoch.columns if c.endswith("_epoch")]:
        per_epoch = per_epoch.drop(columns=[f"{name}_step"], errors="ignore")
        per_epoch = per_epoch.rename(columns={f"{name}_epoch": name})
    per_epoch.index = per_epoch.index.astype(int)
    return per_epoch.dropna(axis=1, how="all")


def plot_training_curves(history_csv: str | os.PathLike, path: str | os.PathLike) -> None:
    """Save loss and accuracy per epoch from a CSVLogger metrics / history CSV."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    table = epoch_metrics(pd.read_csv(history_csv))
    panels = {
        "loss": [c for c in table.columns if "loss" in c],
        "accuracy": [c for c in table.columns if "acc" in c],
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, columns) in zip(axes, panels.items(), strict=True):
        for column in columns:
            series = table[column].dropna()
            ax.plot(series.index, series.to_numpy(), marker="o", markersize=3, label=column)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        if columns:
            ax.legend()
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, f"no {title} recorded", ha="center", va="center")
    if "val_acc" in table and table["val_acc"].notna().any():
        best = int(table["val_acc"].idxmax())
        axes[1].axvline(
            best, color="grey", linestyle="--", linewidth=1, label=f"best val_acc (epoch {best})"
        )
        axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------- the stage


def rows_of_test_set(index: pd.DataFrame, roles: pd.Series) -> pd.DataFrame:
    """The index rows whose role is ``test``, in id order."""
    test_ids = roles.index[roles == "test"]
    rows = index[index["id"].isin(test_ids)].sort_values("id").reset_index(drop=True)
    if rows.empty:
        raise DataError("the split has no test image: nothing to evaluate")
    return rows


def evaluate_predictions(
    rows: pd.DataFrame,
    probs: np.ndarray,
    class_names: Sequence[str],
    outputs: Mapping[str, str],
    baselines: Mapping[str, Any] | None = None,
) -> dict:
    """Write metrics.json, confusion.csv/.png, per_class.csv and predictions.csv; return the metrics.

    ``baselines`` (``imgpipe.baselines``: majority, linear_pixels) go into
    metrics.json under ``baselines``.
    """
    if probs.shape != (len(rows), len(class_names)):
        raise DataError(
            f"the model gave probabilities of shape {probs.shape} for {len(rows)} test images "
            f"and {len(class_names)} classes: was it trained on this index?"
        )
    names = list(class_names)
    y_true = np.searchsorted(np.asarray(names), rows["label"].astype(str).to_numpy())
    y_pred = probs.argmax(axis=1)
    metrics = classification_metrics(y_true, y_pred, names)
    metrics = {"n_test": metrics.pop("n"), **metrics, "classes": names}
    if baselines is not None:
        metrics["baselines"] = dict(baselines)
    write_json(metrics, outputs["metrics"])
    cm = confusion_matrix_table(y_true, y_pred, names)
    write_csv(cm, outputs["confusion"], index=True)
    plot_confusion(cm, outputs["confusion_png"])
    write_csv(per_class_table(y_true, y_pred, names), outputs["per_class"])
    write_csv(predictions_table(rows, probs, names), outputs["predictions"])
    log.info(
        "test: %d images, accuracy %.4f, macro F1 %.4f",
        metrics["n_test"],
        metrics["accuracy"],
        metrics["f1_macro"],
    )
    return metrics


def run_evaluate(job: StageJob, predict: Callable[..., np.ndarray] | None = None) -> dict:
    """The evaluate stage: predict the test images with the final model and write every output.

    The baselines (``imgpipe.baselines``) are fitted on the final model's
    training images and scored on the same test images; a model that does not
    beat them gets a warning line in the log and on the terminal.

    ``predict(checkpoint, images, ids=...) -> probabilities`` defaults to
    ``imgpipe.predict.predict_proba`` (images are read from the shards batch by batch).
    """
    from imgpipe.baselines import both_baselines
    from imgpipe.dataset import class_names, label_codes, load_index, open_images
    from imgpipe.split import final_roles, load_split, role_ids

    if predict is None:
        from imgpipe.modelfile import configured_factories
        from imgpipe.predict import predict_proba

        # A model built by package.module:factory loads when the user's config names it.
        predict = partial(predict_proba, model_factory=configured_factories(job.config))
    index = load_index(job.input["index"])
    roles = load_split(job.input["split"])
    rows = rows_of_test_set(index, roles)
    images = open_images(index)
    probs = predict(job.input["model"], images, ids=rows["id"].to_numpy())
    # The final model's training images (train, or train + val after a sweep: its input best).
    train_ids = role_ids(roles, *final_roles("best" in job.input)[0])
    baselines = both_baselines(
        images, label_codes(index), train_ids, rows["id"].to_numpy(), class_names(index)
    )
    metrics = evaluate_predictions(
        rows, np.asarray(probs, dtype=np.float64), class_names(index), job.output, baselines
    )
    plot_training_curves(job.input["history"], job.output["curves"])
    warn_if_beaten(metrics, job.input["history"], job.input.get("train_summary"))
    return metrics


def warn_if_beaten(
    metrics: Mapping[str, Any], history_csv: str | os.PathLike, summary_json: str | None
) -> str | None:
    """Log (and show on the terminal) one line when the model does not beat its baselines; return it."""
    import json

    from imgpipe.baseline_warning import likely_causes, warning_line
    from imgpipe.logs import TERMINAL

    history = pd.read_csv(history_csv) if os.path.getsize(history_csv) else None
    summary = None
    if summary_json and os.path.isfile(summary_json):
        with open(summary_json, encoding="utf-8") as fh:
            summary = json.load(fh)
    line = warning_line(metrics, metrics.get("baselines"), likely_causes(history, summary))
    if line:
        log.warning("%s; see the report's training curves", line, extra={TERMINAL: True})
    return line
