"""Test-set evaluation of the final model: metrics, confusion matrix, predictions and plots."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.core.atomic import write_csv, write_json
from imgpipe.core.errors import DataError
from imgpipe.core.plots import pyplot, save_figure
from imgpipe.learn.metrics import confusion_matrix_table, per_class_table, test_set_metrics
from imgpipe.workflow.stage_job import StageJob

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


def evaluate_predictions(
    rows: pd.DataFrame,
    probs: np.ndarray,
    class_names: Sequence[str],
    outputs: Mapping[str, str],
    baselines: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> dict:
    """Write metrics.json, confusion.csv/.png, per_class.csv and predictions.csv; return the metrics.

    ``baselines`` (``imgpipe.learn.baselines``: majority, linear_pixels) go into
    metrics.json under ``baselines``, ``calibration`` (ECE and NLL before and
    after the temperature) under ``calibration``.
    """
    if probs.shape != (len(rows), len(class_names)):
        raise DataError(
            f"the model gave probabilities of shape {probs.shape} for {len(rows)} test images "
            f"and {len(class_names)} classes: was it trained on this index?"
        )
    names = list(class_names)
    y_true = np.searchsorted(np.asarray(names), rows["label"].astype(str).to_numpy())
    y_pred = probs.argmax(axis=1)
    metrics = test_set_metrics(y_true, y_pred, names)
    if baselines is not None:
        metrics["baselines"] = dict(baselines)
    if calibration is not None:
        metrics["calibration"] = dict(calibration)
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

    The baselines (``imgpipe.learn.baselines``) are fitted on the final model's
    training images and scored on the same test images; a model that does not
    beat them gets a warning line in the log and on the terminal.

    By default the model's raw logits of the test images are read once
    (``imgpipe.infer.inference.predict_logits``, from the shards batch by batch): the
    probabilities are ``softmax(logits / T)`` with the model file's
    temperature, and metrics.json's ``calibration`` compares them with T = 1
    (``imgpipe.learn.calibration.calibration_summary``). A ``predict(checkpoint,
    images, ids=...) -> probabilities`` given instead is used as it is (no
    ``calibration`` entry).
    """
    from imgpipe.data.dataset import class_names, label_codes, load_index, open_images
    from imgpipe.data.split import final_roles, load_split, role_ids, rows_of_test_set
    from imgpipe.learn.baselines import both_baselines

    index = load_index(job.input["index"])
    roles = load_split(job.input["split"])
    rows = rows_of_test_set(index, roles)
    images = open_images(index)
    calibration = None
    if predict is None:
        probs, calibration = calibrated_test_probabilities(job, images, rows, class_names(index))
    else:
        probs = predict(job.input["model"], images, ids=rows["id"].to_numpy())
    # The final model's training images (train, or train + val after a sweep: its input best).
    train_ids = role_ids(roles, *final_roles("best" in job.input)[0])
    baselines = both_baselines(
        images, label_codes(index), train_ids, rows["id"].to_numpy(), class_names(index)
    )
    metrics = evaluate_predictions(
        rows,
        np.asarray(probs, dtype=np.float64),
        class_names(index),
        job.output,
        baselines,
        calibration,
    )
    plot_training_curves(job.input["history"], job.output["curves"])
    warn_if_beaten(metrics, job.input["history"], job.input.get("train_summary"))
    return metrics


def calibrated_test_probabilities(
    job: StageJob, images: Any, rows: pd.DataFrame, class_names: Sequence[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """The test images' calibrated probabilities and the ``calibration`` entry of metrics.json.

    One pass of the model over the test images gives the raw logits; the
    temperature and where it was fitted come from the model file and its
    training summary.
    """
    from imgpipe.infer.inference import predict_logits
    from imgpipe.infer.modelfile import configured_factories, read_checkpoint
    from imgpipe.learn.calibration import calibrated_probabilities, calibration_summary

    # A model built by package.module:factory loads when the user's config names it.
    logits = predict_logits(
        job.input["model"],
        images,
        ids=rows["id"].to_numpy(),
        model_factory=configured_factories(job.config),
    )
    hparams = read_checkpoint(job.input["model"]).get("hyper_parameters") or {}
    temperature = float(hparams.get("temperature", 1.0))
    y_true = np.searchsorted(np.asarray(list(class_names)), rows["label"].astype(str).to_numpy())
    summary = calibration_summary(logits, y_true, temperature, fitted_on(job))
    log.info(
        "calibration: T %.3f; test ECE %.4f -> %.4f, NLL %.4f -> %.4f",
        temperature,
        summary["ece_before"],
        summary["ece_after"],
        summary["nll_before"],
        summary["nll_after"],
    )
    return calibrated_probabilities(logits, temperature), summary


def fitted_on(job: StageJob) -> str:
    """Where the final model's temperature was fitted, as its training summary says."""
    import json

    path = job.input.get("train_summary")
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            found = json.load(fh).get("temperature_fitted_on")
        if found:
            return str(found)
    return "unknown (the training summary does not say)"


def warn_if_beaten(
    metrics: Mapping[str, Any], history_csv: str | os.PathLike, summary_json: str | None
) -> str | None:
    """Log (and show on the terminal) one line when the model does not beat its baselines; return it."""
    import json

    from imgpipe.core.logs import TERMINAL
    from imgpipe.learn.baseline_warning import likely_causes, warning_line

    history = pd.read_csv(history_csv) if os.path.getsize(history_csv) else None
    summary = None
    if summary_json and os.path.isfile(summary_json):
        with open(summary_json, encoding="utf-8") as fh:
            summary = json.load(fh)
    line = warning_line(metrics, metrics.get("baselines"), likely_causes(history, summary))
    if line:
        log.warning("%s; see the report's training curves", line, extra={TERMINAL: True})
    return line
