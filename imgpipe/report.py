"""The results page: one self-contained HTML file, a JSON of the headline numbers, and the run log.

Every input is optional at render time: a missing file (sweep disabled, a
cluster feature space not configured, a stage that has not run) becomes a short
"not run" note in its section, never an error. Text taken from the data goes
through ``html.escape`` (or pandas' escaping ``to_html``); images (the stages'
figures and the charts drawn here with matplotlib) are embedded as base64 data
URIs, so the page makes no request of its own.

The page is written for people: result keys and config keys appear under
human names with units (``LABELS``, ``CONFIG_LABELS``, ``REASONS``), every
table and figure comes with a sentence saying what it shows.

``results/runs.csv`` holds one row per finished run of the workflow (see
:func:`record_run`): the report stage appends it, once per run even when the
stage is retried, and the page shows the runs side by side.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from imgpipe.core.atomic import plain, write_csv, write_text
from imgpipe.core.atomic import read_csv as read_table_file
from imgpipe.core.plots import png_bytes, pyplot
from imgpipe.data.listing import printable
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")

# (id, heading) of each section, in reading order; the ids are stable anchors.
SECTIONS = (
    ("overview", "At a glance"),
    ("runs", "Runs side by side"),
    ("cleaning", "Dataset and cleaning"),
    ("augmentation", "Augmentation"),
    ("sweep", "Hyper-parameter sweep"),
    ("cv", "Cross-validation"),
    ("test", "Test set"),
    ("training", "Training curves"),
    ("suspects", "Suspect labels"),
    ("clusters", "Clusters"),
    ("config", "Configuration"),
)
# Columns of sweep/trials.csv that are not swept values.
SWEEP_BOOKKEEPING = {"trial", "val_acc", "val_loss", "best_epoch", "epochs", "steps", "seconds"}
CV_METRICS = ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro")
CLUSTER_HEADLINE = ("hungarian_accuracy", "nmi", "ari", "silhouette")
CLUSTER_ROWS = (
    "scored_on",
    "hungarian_accuracy",
    "purity",
    "nmi",
    "ari",
    "silhouette",
    "n_samples",
    "n_clusters",
    "n_classes",
    "inertia",
    "n_features",
    "method",
    "fit_seconds",
)
CLUSTER_ROLE_COLUMNS = ("n_samples", "hungarian_accuracy", "purity", "nmi", "ari", "silhouette")
CLUSTER_KEY = re.compile(r"^cluster_(?P<features>.+)_(?P<kind>metrics|montage|scatter)$")
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
# Most classes drawn in the class-distribution chart (the largest; the table lists all).
MAX_CHART_CLASSES = 40
RUN_COLUMNS = (
    "run_id",
    "finished",
    "config_hash",
    "data_fingerprint",
    "code_version",
    "images",
    "test_accuracy",
    "test_balanced_accuracy",
    "test_f1_macro",
    "baseline_majority_accuracy",
    "baseline_majority_balanced_accuracy",
    "baseline_linear_accuracy",
    "baseline_linear_balanced_accuracy",
    "warning",
    "cv_accuracy_mean",
    "cv_accuracy_std",
    "best_trial",
    "best_trial_metric",
    "best_trial_score",
    "changes",
    "config",
)

# ----------------------------------------------------------------------------- human names

# Result keys and table columns as a reader says them (units in the name).
LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "precision_macro": "Macro precision",
    "recall_macro": "Macro recall",
    "f1_macro": "Macro F1",
    "n_test": "Test images",
    "classes_tested": "Classes with test images",
    "hungarian_accuracy": "Hungarian accuracy",
    "purity": "Purity",
    "nmi": "NMI (normalised mutual information)",
    "ari": "ARI (adjusted Rand index)",
    "silhouette": "Silhouette",
    "inertia": "Inertia (sum of squared distances)",
    "n_samples": "Images scored",
    "n_clusters": "Clusters",
    "n_classes": "Classes",
    "n_features": "Feature dimensions",
    "method": "K-means method",
    "fit_seconds": "K-means time (s)",
    "scored_on": "Scored on",
    "class": "Class",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "support": "Test images",
    "trial": "Trial",
    "val_acc": "Validation accuracy",
    "val_loss": "Validation loss",
    "train_loss": "Training loss",
    "best_epoch": "Best epoch",
    "epochs": "Epochs trained",
    "seconds": "Time (s)",
    "fold": "Fold",
    "baseline_majority_accuracy": "Majority class: accuracy",
    "baseline_majority_balanced_accuracy": "Majority class: balanced accuracy",
    "baseline_majority_f1_macro": "Majority class: macro F1",
    "baseline_linear_accuracy": "Linear on pixels: accuracy",
    "baseline_linear_balanced_accuracy": "Linear on pixels: balanced accuracy",
    "baseline_linear_f1_macro": "Linear on pixels: macro F1",
    "id": "Image id",
    "path": "File",
    "relpath": "File",
    "label": "Label",
    "source": "Folder",
    "reason": "Reason",
    "detail": "Detail",
    "given_label": "Given label",
    "suggested_label": "Suggested label",
    "score": "Label quality (low = suspect)",
}
# Config keys (dotted) as a reader says them; others fall back to humanise().
CONFIG_LABELS = {
    "train.lr": "Learning rate",
    "train.weight_decay": "Weight decay",
    "train.batch_size": "Batch size",
    "train.momentum": "Momentum",
    "train.label_smoothing": "Label smoothing",
    "train.max_epochs": "Epochs (at most)",
    "train.optimizer": "Optimiser",
    "train.schedule": "Learning-rate schedule",
    "train.l1": "L1 penalty",
    "train.freeze": "Backbone freezing",
    "train.backbone_lr_mult": "Backbone learning-rate factor",
    "train.class_weights": "Class weights",
    "train.sampler": "Sampler",
    "train.early_stopping_patience": "Early-stopping patience (epochs)",
    "model.name": "Model",
    "model.dropout": "Dropout",
    "model.channels": "Channels",
    "model.weights": "Initial weights",
    "augment.rotation": "Rotation (degrees)",
    "augment.translate": "Shift (fraction of the side)",
    "augment.brightness": "Brightness jitter",
    "augment.contrast": "Contrast jitter",
}
# Rejection reasons (rejected.csv) as sentences' subjects.
REASONS = {
    "hidden": "Hidden file or folder",
    "no_class": "No class folder",
    "unsupported_extension": "Not an image file type",
    "missing_file": "Missing file",
    "outside_root": "Outside the data folder",
    "duplicate_row": "Listed twice in the manifest",
    "broken_symlink": "Broken symbolic link",
    "symlink_loop": "Symbolic link loop",
    "unreadable": "Unreadable",
    "zero_byte": "Empty file (0 bytes)",
    "not_image": "Not an image",
    "truncated": "Truncated file",
    "too_large": "Too many pixels (decompression bomb)",
    "exact_duplicate": "Exact duplicate",
    "near_duplicate": "Near duplicate",
    "label_conflict": "Same pixels under two labels",
    "low_information": "Blank or near-constant",
    "too_dark": "Too dark",
    "too_bright": "Too bright",
    "blurry": "Blurry",
    "too_small": "Too small",
    "odd_aspect": "Odd aspect ratio",
    "small_class": "Class with too few images",
    "test_leak": "Test image duplicating a training image",
}
CLEAN_SETTINGS = {
    "exact_duplicates": "Exact duplicates: keep one copy",
    "label_conflicts": "Same pixels under two labels: reject",
    "near_duplicates": "Near duplicates",
    "near_duplicate_distance": "Near duplicates: hash distance at most (bits of 64)",
    "near_duplicate_correlation": "Near duplicates: thumbnail correlation at least",
    "low_information": "Blank: grey-level standard deviation below",
    "dark": "Too dark: 99th brightness percentile below (0-255)",
    "bright": "Too bright: 1st brightness percentile above (0-255)",
    "blur": "Blurry: sharpness below",
    "min_side": "Too small: shorter side below (px)",
    "max_aspect": "Odd aspect ratio: long / short side above",
    "min_per_class": "Class too small: fewer images than",
}
NEAR_DUPLICATES = {
    "mode": "Handling",
    "components_above_one": "Linked sets of 2+ images (kept together in split and folds)",
    "images_in_components_above_one": "Images in linked sets of 2+",
    "max_component_size": "Largest linked set (images)",
    "groups_above_one": "Groups of 2+ images shown (each member linked to its leader)",
    "images_in_groups_above_one": "Images in groups of 2+",
    "max_group_size": "Largest group (images)",
    "groups": "Groups, single images included",
    "candidate_pairs": "Candidate pairs (perceptual hashes close)",
    "correlations_computed": "Pairs compared pixel by pixel",
}
ROLES = {
    "test": "Test images",
    "train": "Training images",
    "val": "Validation images",
    "all": "All images",
    "none": "Images without a role",
}
FEATURES = {"pixels": "Pixels", "embeddings": "Embeddings of the final model"}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:1rem 2rem 4rem;background:#fff}
h1{margin-top:.5rem}h2{border-bottom:2px solid #4c72b0;padding-bottom:.2rem;margin-top:2.5rem}
nav ol{columns:2;background:#f0f3f8;padding:.8rem 2.5rem;border-radius:6px}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ccd;padding:.25rem .6rem;text-align:left;font-variant-numeric:tabular-nums}
th{background:#eef1f7}tr.current td{background:#fff7d6;font-weight:600}
.note{color:#666;font-style:italic}.explain{color:#333;max-width:52rem}
.tables{display:flex;flex-wrap:wrap;gap:2rem}
.figures{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
figure{margin:.5rem 0}figcaption{font-size:.85rem;color:#555;max-width:46rem}
img{max-width:100%;height:auto;border:1px solid #ddd}
pre{background:#f5f5f5;padding:.8rem;overflow-x:auto;font-size:.85rem}
code{background:#f0f0f0;padding:0 .2rem}
.headline{display:flex;flex-wrap:wrap;gap:1rem}
.headline div{background:#f0f3f8;border-radius:6px;padding:.5rem 1rem;min-width:9rem}
.headline span,.headline b{display:block}.headline b{font-size:1.4rem}.headline small{display:block;color:#555}
.warning{background:#fff1e6;border-left:6px solid #c0392b;padding:.6rem 1rem;margin:1rem 0}
.warning h3{margin:.2rem 0;color:#c0392b}
details{margin:.5rem 0}summary{cursor:pointer;color:#4c72b0}
#imgcheck{font-size:.75rem;color:#999}
"""

# Marks every image data-ok="1"/"0" once the page has loaded and writes the
# counts into #imgcheck, so a headless browser's DOM dump shows broken images.
IMAGE_CHECK = """
window.addEventListener("load", function () {
  var ok = 0, broken = 0;
  document.querySelectorAll("img").forEach(function (img) {
    var good = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-ok", good ? "1" : "0");
    if (good) { ok++; } else { broken++; }
  });
  var box = document.getElementById("imgcheck");
  box.setAttribute("data-ok", ok);
  box.setAttribute("data-broken", broken);
  box.textContent = ok + " images shown, " + broken + " broken";
});
"""


def humanise(key: str) -> str:
    """A key as words: ``kept_per_class`` -> ``Kept per class``; ``train.foo_bar`` -> ``Foo bar (train)``."""
    section, _, name = str(key).rpartition(".")
    words = name.replace("_", " ").strip()
    words = words[:1].upper() + words[1:]
    return f"{words} ({section.replace('_', ' ')})" if section else words


def label(key: str) -> str:
    """The human name of a result key or column."""
    return LABELS.get(str(key)) or humanise(key)


def config_label(key: str) -> str:
    """The human name of a dotted config key (``train.lr`` -> ``Learning rate``)."""
    return CONFIG_LABELS.get(str(key)) or humanise(key)


def reason_label(reason: str) -> str:
    """The human name of a rejection reason."""
    return REASONS.get(str(reason)) or humanise(reason)


# ----------------------------------------------------------------------------- inputs


# The export rule's sidecars the report shows (test accuracy of each export) when an
# export has been made: the export is not part of the default target.
EXPORT_SIDECARS = {"export_onnx": "model.onnx.json", "export_int8": "model.int8.onnx.json"}


def existing_exports(results: str) -> list[str]:
    """The ``EXPORT_SIDECARS`` keys whose file exists under ``results/export`` (read while the DAG is built)."""
    return [key for key, name in EXPORT_SIDECARS.items() if Path(results, "export", name).is_file()]


def input_paths(
    results: str,
    sweep_enabled: bool,
    features: Sequence[str],
    folds: int = 0,
    trials: Sequence[str] = (),
    exports: Sequence[str] = (),
) -> dict[str, Any]:
    """The named files the report reads; sweep and per-feature cluster files only when configured.

    ``folds`` (cv.k) and ``trials`` (the sweep's trial folder names) add the
    training histories the curves are drawn from (lists of paths); ``exports``
    (``existing_exports``) the export sidecars whose test accuracy the page shows.
    """
    paths: dict[str, Any] = {
        "config": f"{results}/config.yaml",
        "clean_summary": f"{results}/clean/summary.json",
        "clean_index": f"{results}/clean/index.csv",
        "rejected": f"{results}/clean/rejected.csv",
        "rejected_examples": f"{results}/clean/rejected_examples.png",
        "augment_preview": f"{results}/augment/preview.png",
        "cv_summary": f"{results}/cv/summary.csv",
        "suspects": f"{results}/cv/suspect_labels.csv",
        "suspects_png": f"{results}/cv/suspect_labels.png",
        "test_metrics": f"{results}/evaluate/metrics.json",
        "confusion": f"{results}/evaluate/confusion.png",
        "per_class": f"{results}/evaluate/per_class.csv",
        "final_history": f"{results}/train/final/history.csv",
        # Steps and early stopping: the causes a baseline warning names.
        "final_summary": f"{results}/train/final/summary.json",
    }
    paths["final_summary"] = f"{results}/train/final/summary.json"
    if folds:
        paths["fold_histories"] = [f"{results}/cv/fold-{k}/history.csv" for k in range(folds)]
        paths["fold_summaries"] = [f"{results}/cv/fold-{k}/summary.json" for k in range(folds)]
    if sweep_enabled:
        paths["sweep_trials"] = f"{results}/sweep/trials.csv"
        paths["sweep_best"] = f"{results}/sweep/best.yaml"
        paths["sweep_plot"] = f"{results}/sweep/sweep.png"
        if trials:
            paths["trial_histories"] = [
                f"{results}/sweep/trials/{trial}/history.csv" for trial in trials
            ]
            paths["trial_summaries"] = [
                f"{results}/sweep/trials/{trial}/summary.json" for trial in trials
            ]
    for name in features:
        for kind in ("metrics", "montage", "scatter"):
            paths[f"cluster_{name}_{kind}"] = f"{results}/cluster/{name}/{kind}.{_ext(kind)}"
    for key in exports:
        paths[key] = f"{results}/export/{EXPORT_SIDECARS[key]}"
    return paths


def _ext(kind: str) -> str:
    return "json" if kind == "metrics" else "png"


def _existing(inputs: Mapping[str, Any], key: str) -> Path | None:
    path = inputs.get(key)
    return Path(path) if isinstance(path, str | os.PathLike) and Path(path).is_file() else None


def read_json(inputs: Mapping[str, Any], key: str) -> dict | None:
    """The JSON object of input ``key``, or None when it is absent."""
    path = _existing(inputs, key)
    if path is None:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {"value": data}


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return read_table_file(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def read_csv(inputs: Mapping[str, Any], key: str) -> pd.DataFrame | None:
    """The table of input ``key`` (all columns as read by pandas), or None when it is absent."""
    path = _existing(inputs, key)
    return None if path is None else _read_table(path)


def read_text(inputs: Mapping[str, Any], key: str) -> str | None:
    """The text of input ``key``, or None when it is absent."""
    path = _existing(inputs, key)
    return None if path is None else path.read_text(encoding="utf-8")


def read_yaml(inputs: Mapping[str, Any], key: str) -> dict | None:
    """The YAML mapping of input ``key``, or None when it is absent (or not a mapping)."""
    text = read_text(inputs, key)
    data = yaml.safe_load(text) if text is not None else None
    return data if isinstance(data, dict) else None


def cluster_features(inputs: Mapping[str, Any]) -> list[str]:
    """The feature spaces that have cluster inputs, in input order."""
    found = []
    for key in inputs:
        match = CLUSTER_KEY.match(key)
        if match and match["features"] not in found:
            found.append(match["features"])
    return found


def input_files(inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every (input name, path) pair, list inputs flattened, in name order."""
    pairs = []
    for name in sorted(inputs):
        value = inputs[name]
        for path in [value] if isinstance(value, str | os.PathLike) else list(value):
            pairs.append((name, str(path)))
    return pairs


# ----------------------------------------------------------------------------- numbers


def flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys (``total.kept``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def find_number(data: Mapping | None, names: Sequence[str]) -> float | int | None:
    """The first numeric entry named one of ``names`` (dotted keys); else one whose key ends so.

    Exact keys win over suffixes, so a top-level ``accuracy`` is preferred to
    ``per_class.3.accuracy``.
    """
    if not data:
        return None
    flat = {k: v for k, v in flatten(data).items() if _is_number(v)}
    for name in names:
        if name in flat:
            return plain(flat[name])
    for name in names:
        for key, value in flat.items():
            if key.endswith(f".{name}"):
                return plain(value)
    return None


def sweep_metric(trials: pd.DataFrame) -> str | None:
    """The score column of the sweep table: its first validation metric (the tie-breaker follows it)."""
    return next((c for c in trials.columns if c in ("val_acc", "val_loss")), None)


def sorted_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials best first, as the sweep ranked them (imgpipe.learn.sweep.rank_trials)."""
    from imgpipe.learn.sweep import rank_trials

    metric = sweep_metric(trials)
    if metric is None or trials.empty:
        return trials
    return rank_trials(trials, metric)


def cv_row(summary: pd.DataFrame, name: str) -> dict[str, float] | None:
    """The ``mean`` or ``std`` row of cv/summary.csv, recomputed from the folds when absent."""
    folds = summary["fold"].astype(str)
    rows = summary[folds == name]
    metrics = [c for c in summary.columns if c != "fold"]
    if not rows.empty:
        return {c: plain(pd.to_numeric(rows.iloc[0][c], errors="coerce")) for c in metrics}
    per_fold = summary[~folds.isin(["mean", "std"])][metrics].apply(pd.to_numeric, errors="coerce")
    if per_fold.empty:
        return None
    values = per_fold.mean() if name == "mean" else per_fold.std(ddof=1).fillna(0.0)
    return {c: plain(values[c]) for c in metrics}


def headline(inputs: Mapping[str, Any], title: str = "") -> dict[str, Any]:
    """The headline numbers for machines (results/report/summary.json)."""
    return {
        "title": title,
        "images": _images_headline(inputs),
        "test": _test_headline(inputs),
        "cv": _cv_headline(inputs),
        "sweep": _sweep_headline(inputs),
        "clusters": _cluster_headline(inputs),
    }


def _images_headline(inputs: Mapping[str, Any]) -> dict[str, Any] | None:
    summary = read_json(inputs, "clean_summary")
    rejected = read_csv(inputs, "rejected")
    if summary is None and rejected is None:
        return None
    per_class = (summary or {}).get("kept_per_class")
    kept = find_number(summary, ["total.kept", "n_kept", "kept"])
    if kept is None and isinstance(per_class, Mapping):
        kept = sum(v for v in per_class.values() if _is_number(v))
    if rejected is not None:
        n_rejected: Any = len(rejected)
        per_reason = _reason_counts(rejected)
    else:
        n_rejected = find_number(summary, ["total.rejected", "n_rejected", "rejected"])
        per_reason = (summary or {}).get("rejected_per_reason")
    return {
        "kept": kept,
        "rejected": n_rejected,
        "kept_per_class": per_class if isinstance(per_class, Mapping) else None,
        "rejected_per_reason": per_reason,
    }


def _reason_counts(rejected: pd.DataFrame) -> dict[str, int]:
    if "reason" not in rejected.columns:
        return {}
    counts = rejected["reason"].astype(str).value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items())}


def _test_headline(inputs: Mapping[str, Any]) -> dict[str, Any] | None:
    from imgpipe.learn.baseline_warning import (
        flat_baselines,
        likely_causes,
        shortfalls,
        warning_line,
    )

    metrics = read_json(inputs, "test_metrics")
    if metrics is None:
        return None
    result = {
        "accuracy": find_number(metrics, ["accuracy", "acc"]),
        "balanced_accuracy": find_number(metrics, ["balanced_accuracy"]),
        "f1_macro": find_number(metrics, ["f1_macro", "macro_f1", "macro avg.f1-score"]),
        "n_test": find_number(metrics, ["n_test"]),
    }
    calibration = metrics.get("calibration")
    if isinstance(calibration, Mapping):
        result |= {
            key: calibration.get(key)
            for key in ("temperature", "ece_before", "ece_after", "nll_before", "nll_after")
        }
    baselines = metrics.get("baselines")
    if not isinstance(baselines, Mapping):
        return result
    result["baselines"] = {
        key: (None if value != value else value)  # NaN (a skipped baseline) as null
        for key, value in flat_baselines(baselines).items()
    }
    skipped = {
        name: scores["skipped"]
        for name, scores in baselines.items()
        if isinstance(scores, Mapping) and scores.get("skipped")
    }
    if skipped:
        result["baselines_skipped"] = skipped
    history = _existing(inputs, "final_history")
    causes = likely_causes(
        _read_table(history) if history is not None else None, read_json(inputs, "final_summary")
    )
    result["warning"] = warning_line(result, baselines, causes)
    result["shortfalls"] = shortfalls(result, baselines)
    result["warning_causes"] = causes if result["warning"] else []
    return result


def _cv_headline(inputs: Mapping[str, Any]) -> dict[str, Any] | None:
    summary = read_csv(inputs, "cv_summary")
    if summary is None or "fold" not in summary.columns:
        return None
    mean, std = cv_row(summary, "mean") or {}, cv_row(summary, "std") or {}
    folds = summary[~summary["fold"].astype(str).isin(["mean", "std"])]
    result: dict[str, Any] = {"k": len(folds)}
    for metric in CV_METRICS:
        if metric in mean:
            result[f"{metric}_mean"] = mean[metric]
            result[f"{metric}_std"] = std.get(metric)
    for column in mean:
        if column.startswith("baseline_"):
            result[f"{column}_mean"] = mean[column]
    return result


def _sweep_headline(inputs: Mapping[str, Any]) -> dict[str, Any] | None:
    trials = read_csv(inputs, "sweep_trials")
    if trials is None or trials.empty:
        return None
    metric = sweep_metric(trials)
    best = sorted_trials(trials).iloc[0]
    params = {c: plain(best[c]) for c in trials.columns if c not in SWEEP_BOOKKEEPING}
    return {
        "n_trials": len(trials),
        "metric": metric,
        "best_trial": plain(best["trial"]) if "trial" in trials.columns else None,
        "best_value": plain(best[metric]) if metric else None,
        "best_params": params,
    }


def _cluster_headline(inputs: Mapping[str, Any]) -> dict[str, Any]:
    result = {}
    for name in cluster_features(inputs):
        metrics = read_json(inputs, f"cluster_{name}_metrics")
        if metrics is not None:
            result[name] = {key: find_number(metrics, [key]) for key in CLUSTER_HEADLINE}
    return result


# ----------------------------------------------------------------------------- runs.csv


def config_hash(inputs: Mapping[str, Any]) -> str | None:
    """12 hex digits of the effective configuration's content (comments and key order ignored)."""
    config = read_yaml(inputs, "config")
    if config is None:
        return None
    text = json.dumps(plain(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def data_fingerprint(inputs: Mapping[str, Any]) -> str | None:
    """12 hex digits of the clean data: every kept image's content hash and label, in any order."""
    index = read_csv(inputs, "clean_index")
    if index is None or not {"sha256", "label"} <= set(index.columns):
        return None
    rows = sorted(f"{sha}\t{lab}" for sha, lab in zip(index["sha256"], index["label"], strict=True))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:12]


def code_version(folder: str | os.PathLike | None = None) -> str:
    """``imgpipe.__version__``, plus the git commit (``+dirty`` with local edits) of a git checkout."""
    from imgpipe import __version__

    folder = Path(folder) if folder is not None else Path(__file__).resolve().parents[1]
    version = __version__
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if commit.returncode == 0 and commit.stdout.strip():
            version += f" {commit.stdout.strip()}"
            status = subprocess.run(
                ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no", "."],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if status.returncode == 0 and status.stdout.strip():
                version += "+dirty"
    except (OSError, subprocess.SubprocessError):  # no git: the version alone
        pass
    return version


def run_id(inputs: Mapping[str, Any]) -> str:
    """12 hex digits naming this run: the configuration and the content of every report input.

    A retried or forced report over the same results gets the same id (and
    adds no row); any rerun upstream that changed a result gets a new one.
    """
    digest = hashlib.sha256((config_hash(inputs) or "").encode())
    for name, path in input_files(inputs):
        digest.update(f"\n{name}\t{Path(path).name}\t".encode())
        if Path(path).is_file():
            with open(path, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def flat_config(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The effective configuration as {dotted key: value}."""
    return {k: plain(v) for k, v in flatten(read_yaml(inputs, "config") or {}).items()}


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any], most: int = 6) -> str:
    """The config keys that differ, as ``train.lr 0.01 -> 0.02; ...`` (at most ``most``, then a count)."""
    keys = sorted(set(before) | set(after))
    missing = "(unset)"
    changed = [
        f"{key} {_short(before.get(key, missing))} → {_short(after.get(key, missing))}"
        for key in keys
        if before.get(key, missing) != after.get(key, missing)
    ]
    if not changed:
        return "no config change"
    shown = "; ".join(changed[:most])
    return shown + (f"; and {len(changed) - most} more" if len(changed) > most else "")


def _short(value: Any) -> str:
    text = (
        json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else value
    )
    return text if len(text) <= 40 else text[:37] + "..."


def read_runs(path: str | os.PathLike) -> pd.DataFrame:
    """The run log (results/runs.csv), empty with its columns when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    return read_table_file(path, dtype={"run_id": str, "config_hash": str, "data_fingerprint": str})


def run_row(
    inputs: Mapping[str, Any],
    numbers: Mapping[str, Any],
    previous: Mapping | None,
    this_run: str | None = None,
) -> dict:
    """This run's row of runs.csv: id, time, config hash, data fingerprint, code, headline numbers.

    ``changes`` lists the config keys that differ from the ``previous`` row's.
    """
    test, cv = numbers.get("test") or {}, numbers.get("cv") or {}
    sweep, images = numbers.get("sweep") or {}, numbers.get("images") or {}
    baselines = test.get("baselines") or {}
    config = flat_config(inputs)
    before = None
    if previous is not None and isinstance(previous.get("config"), str):
        try:
            before = json.loads(previous["config"])
        except json.JSONDecodeError:
            before = None
    return {
        "run_id": this_run or run_id(inputs),
        "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
        "config_hash": config_hash(inputs),
        "data_fingerprint": data_fingerprint(inputs),
        "code_version": code_version(),
        "images": images.get("kept"),
        "test_accuracy": test.get("accuracy"),
        "test_balanced_accuracy": test.get("balanced_accuracy"),
        "test_f1_macro": test.get("f1_macro"),
        **{key: baselines.get(key) for key in RUN_COLUMNS if key.startswith("baseline_")},
        "warning": test.get("warning") or "",
        "cv_accuracy_mean": cv.get("accuracy_mean"),
        "cv_accuracy_std": cv.get("accuracy_std"),
        "best_trial": sweep.get("best_trial"),
        "best_trial_metric": sweep.get("metric"),
        "best_trial_score": sweep.get("best_value"),
        "changes": "first run" if before is None else config_changes(before, config),
        "config": json.dumps(config, sort_keys=True, ensure_ascii=False, default=str),
    }


def record_run(
    inputs: Mapping[str, Any], numbers: Mapping[str, Any], path: str | os.PathLike
) -> tuple[pd.DataFrame, str]:
    """Append this run's row to the run log ``path`` unless its last row is this run; return (log, id).

    The log is not a Snakemake output (Snakemake would delete it before every
    report job): it is read, extended and written back atomically. The id
    (:func:`run_id`) is the same when the report job is retried or forced
    over unchanged results, so a run is logged once.
    """
    runs = read_runs(path)
    this = run_id(inputs)
    if len(runs) and str(runs["run_id"].iloc[-1]) == this:
        log.info("run %s is already the last row of %s", this, path)
        return runs, this
    previous = runs.iloc[-1].to_dict() if len(runs) else None
    row = run_row(inputs, numbers, previous, this)
    runs = (
        pd.concat([runs, pd.DataFrame([row])], ignore_index=True)
        if len(runs)
        else pd.DataFrame([row])
    )
    columns = [c for c in RUN_COLUMNS if c in runs] + [c for c in runs if c not in RUN_COLUMNS]
    write_csv(runs[columns], path)
    log.info("run %s appended to %s (%d runs)", this, path, len(runs))
    return runs[columns], this


# ----------------------------------------------------------------------------- html pieces


def esc(value: Any) -> str:
    """Text from the data, escaped for HTML (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def note(text: str) -> str:
    """A short italic remark (e.g. why a section is empty)."""
    return f'<p class="note">{esc(text)}</p>'


def explain(text: str) -> str:
    """The sentence that says what the next table or figure shows (``text`` is trusted HTML)."""
    return f'<p class="explain">{text}</p>'


def not_run(what: str) -> str:
    """The note a section shows when its input files are absent."""
    return note(f"Not run: {what} is not among the results of this run.")


def table(frame: pd.DataFrame, max_rows: int | None = None, index: bool = False) -> str:
    """An HTML table of ``frame`` (cells escaped by pandas), cut to ``max_rows`` with a note."""
    shown = frame if max_rows is None else frame.head(max_rows)
    body = shown.to_html(
        index=index, escape=True, border=0, na_rep="", float_format=lambda x: f"{x:.4g}"
    )
    if max_rows is not None and len(frame) > max_rows:
        body += note(f"First {max_rows} of {len(frame)} rows.")
    return body


def human_table(frame: pd.DataFrame, max_rows: int | None = None) -> str:
    """``table`` with every column under its human name (``label``)."""
    return table(frame.rename(columns={c: label(c) for c in frame.columns}), max_rows)


def key_value_table(rows: Sequence[tuple[str, Any]], key_name: str, value_name: str) -> str:
    """A two-column table of (human name, value) rows, the names as row headers."""
    return row_table([(name, [value]) for name, value in rows], [key_name, value_name])


def row_table(rows: Sequence[tuple[str, Sequence[Any]]], headers: Sequence[str]) -> str:
    """A table whose first column names each row (row headers) and the others hold values."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        f'<tr><th scope="row">{esc(name)}</th>'
        + "".join(f"<td>{esc(_fmt(_cell(v)))}</td>" for v in values)
        + "</tr>"
        for name, values in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple | Mapping):
        return json.dumps(value, ensure_ascii=False, default=str)
    return "n/a" if value is None else plain(value)


def figure(src: str, caption: str) -> str:
    """A <figure> of an image data URI with its caption."""
    return (
        f'<figure><img src="{src}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def image(inputs: Mapping[str, Any], key: str, caption: str) -> str:
    """A <figure> with the input image embedded as a data URI, or a note when it is absent."""
    path = _existing(inputs, key)
    if path is None:
        wanted = inputs.get(key)
        return not_run(f"the figure {Path(wanted).name}" if wanted else "this figure")
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return figure(f"data:{mime};base64,{data}", caption)


def chart(fig: Any) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig)).decode("ascii")


def section(section_id: str, body: str) -> str:
    """One <section> with its anchor id and heading."""
    heading = dict(SECTIONS)[section_id]
    return f'<section id="{section_id}">\n<h2>{esc(heading)}</h2>\n{body}\n</section>'


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else _fmt(value)


# ----------------------------------------------------------------------------- sections


def overview_section(numbers: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    """Headline tiles: images, test accuracy and F1, cross-validation, the best trial, clusters."""
    images, test, cv = numbers["images"] or {}, numbers["test"] or {}, numbers["cv"] or {}
    sweep = numbers["sweep"] or {}
    tiles = [
        ("Images kept", _count(images.get("kept")), "after cleaning, in training and test"),
        ("Files rejected", _count(images.get("rejected")), "see Dataset and cleaning"),
        (
            "Test accuracy",
            _fmt(test.get("accuracy")),
            f"on {_count(test.get('n_test'))} held-out test images"
            + beside_baselines(test.get("baselines"), "accuracy"),
        ),
        (
            "Test balanced accuracy",
            _fmt(test.get("balanced_accuracy")),
            "mean recall per class" + beside_baselines(test.get("baselines"), "balanced_accuracy"),
        ),
        (
            "Test macro F1",
            _fmt(test.get("f1_macro")),
            "F1 averaged over the tested classes"
            + beside_baselines(test.get("baselines"), "f1_macro"),
        ),
    ]
    if "accuracy_mean" in cv:
        folds_baselines = {
            key[: -len("_mean")]: value for key, value in cv.items() if key.startswith("baseline_")
        }
        tiles.append(
            (
                f"{cv['k']}-fold cross-validation",
                f"{_fmt(cv['accuracy_mean'])} ± {_fmt(cv['accuracy_std'])}",
                "accuracy, mean ± standard deviation"
                + beside_baselines(folds_baselines, "accuracy"),
            )
        )
    if sweep:
        metric = label(sweep.get("metric") or "score").lower()
        tiles.append(
            (
                "Best sweep trial",
                str(sweep.get("best_trial")),
                # Picked as the best of N on these very images: an optimistic estimate.
                f"{metric} {_fmt(sweep.get('best_value'))}: the best of "
                f"{sweep.get('n_trials')} trials on the same validation images (optimistic)",
            )
        )
    for name, metrics in numbers["clusters"].items():
        scored = (read_json(inputs, f"cluster_{name}_metrics") or {}).get("scored_on", "all")
        where = "on test images" if scored == "test" else "on all images"
        tiles.append(
            (
                f"Clusters of {name}",
                _fmt(metrics.get("hungarian_accuracy")),
                f"Hungarian accuracy {where}",
            )
        )
    cells = "".join(
        f'<div><span class="label">{esc(name)}</span><b>{esc(value)}</b>'
        f"<small>{esc(detail)}</small></div>"
        for name, value, detail in tiles
    )
    intro = explain(
        "The headline numbers of this run. Each section below says how its numbers were "
        "measured; the test-set numbers come from images that no training, sweep or "
        "model choice ever saw."
    )
    warning = baseline_warning(test)
    return section("overview", warning + intro + f'<div class="headline">{cells}</div>')


def beside_baselines(baselines: Mapping[str, Any] | None, metric: str) -> str:
    """`` — majority class 0.374, linear on pixels 0.63``: a tile's reference points (empty without)."""
    parts = [
        f"{name} {_fmt(value)}"
        for name, short in (("majority class", "majority"), ("linear on pixels", "linear"))
        if (value := (baselines or {}).get(f"baseline_{short}_{metric}")) is not None
        and value == value
    ]
    return " — " + ", ".join(parts) if parts else ""


def baseline_warning(test: Mapping[str, Any]) -> str:
    """The block at the top of the page when the model does not beat its baselines (else nothing)."""
    if not test.get("warning"):
        return ""
    found = " and its ".join(test.get("shortfalls") or [])
    causes = test.get("warning_causes") or []
    listed = "".join(f"<li>{esc(cause)}</li>" for cause in causes)
    why = (
        f"<p>Likely causes this run's own training files show:</p><ul>{listed}</ul>"
        if causes
        else "<p>The final model's training history shows no obvious cause (few steps, an "
        "early stop during warm-up, a diverging validation loss).</p>"
    )
    return (
        '<div class="warning" role="alert"><h3>The model does not beat the baselines</h3>'
        f"<p>On the test set its {esc(found)}. Predicting the most common training class for "
        "every image, or logistic regression on the raw pixels, does at least as well: the "
        "network has not learned something useful yet.</p>"
        f'{why}<p>See the <a href="#training">training curves</a> and the '
        '<a href="#test">test set</a> section.</p></div>\n'
    )


def runs_section(runs: pd.DataFrame | None, current: str | None, max_rows: int) -> str:
    """Every logged run of this workflow, newest first, with what changed and what it gave."""
    if runs is None or runs.empty:
        return section("runs", not_run("the run log (results/runs.csv)"))
    shown = runs.iloc[::-1].head(max_rows)
    rows = []
    for _, run in shown.iterrows():
        cv = (
            f"{_fmt(_num(run.get('cv_accuracy_mean')))} ± {_fmt(_num(run.get('cv_accuracy_std')))}"
            if _num(run.get("cv_accuracy_mean")) is not None
            else "n/a"
        )
        best = run.get("best_trial")
        best = (
            f"{best} ({_fmt(_num(run.get('best_trial_score')))})"
            if isinstance(best, str) and best
            else "no sweep"
        )
        warning = run.get("warning")
        cells = [
            _when(run.get("finished")),
            run.get("changes"),
            _fmt(_num(run.get("test_accuracy")))
            + beside_baselines(
                {k: _num(run.get(k)) for k in RUN_COLUMNS if k.startswith("baseline_")},
                "accuracy",
            )
            + (" — does not beat the baselines" if isinstance(warning, str) and warning else ""),
            _fmt(_num(run.get("test_f1_macro"))),
            cv,
            best,
            _count(_int(run.get("images"))),
            run.get("config_hash"),
            run.get("data_fingerprint"),
            run.get("code_version"),
        ]
        css = ' class="current"' if str(run.get("run_id")) == current else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in cells) + "</tr>")
    headers = [
        "Finished",
        "Config changes from the run before",
        "Test accuracy",
        "Test macro F1",
        "Cross-validation accuracy",
        "Best trial (score)",
        "Images",
        "Config",
        "Data",
        "Code",
    ]
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = (
        explain(
            f"Every run of this workflow in this folder, newest first ({len(runs)} in "
            "<code>results/runs.csv</code>): what changed in the configuration since the run "
            "before, and what it gave. This run is highlighted. Config and Data are short "
            "fingerprints of the effective configuration and of the cleaned images with "
            "their labels: equal fingerprints, same inputs."
        )
        + f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    if len(runs) > max_rows:
        body += note(f"Latest {max_rows} of {len(runs)} runs.")
    return section("runs", body)


def _when(value: Any) -> str:
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return _fmt(value)


def _num(value: Any) -> float | None:
    number = pd.to_numeric(value, errors="coerce")
    return None if pd.isna(number) else float(number)


def _int(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def class_chart(kept: Mapping[str, Any], rejected: Mapping[str, Any]) -> str:
    """Stacked bars of kept and rejected images per class, as an embedded figure."""
    classes = sorted(set(kept) | set(rejected), key=str)
    counts = pd.DataFrame(
        {
            "kept": [int(kept.get(c, 0) or 0) for c in classes],
            "rejected": [int(rejected.get(c, 0) or 0) for c in classes],
        },
        index=[str(c) for c in classes],
    )
    caption = "Images per class: kept (blue) and rejected (orange)"
    if len(counts) > MAX_CHART_CLASSES:
        total = counts.sum(axis=1).sort_values(ascending=False, kind="stable")
        counts = counts.loc[sorted(total.index[:MAX_CHART_CLASSES], key=str)]
        caption += f", the {MAX_CHART_CLASSES} largest of {len(classes)} classes"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(min(14.0, max(5.0, 0.4 * len(counts) + 2)), 3.4))
    positions = range(len(counts))
    ax.bar(positions, counts["kept"], color="#4c72b0", label="kept")
    ax.bar(positions, counts["rejected"], bottom=counts["kept"], color="#dd8452", label="rejected")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(
        counts.index,
        rotation=45 if len(counts) > 8 else 0,
        ha="right" if len(counts) > 8 else "center",
    )
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return figure(chart(fig), caption + ".")


def cleaning_section(inputs: Mapping[str, Any], examples_per_reason: int, max_rows: int) -> str:
    """Totals, the class distribution chart, rejections per reason, near duplicates, settings, examples."""
    summary = read_json(inputs, "clean_summary")
    rejected = read_csv(inputs, "rejected")
    if summary is None and rejected is None:
        return section("cleaning", not_run("the clean stage"))
    summary = summary or {}
    parts = []
    total = summary.get("total") or {}
    sources = summary.get("kept_per_source") or {}
    rows = [
        ("Files listed", total.get("listed")),
        ("Images kept", total.get("kept")),
        ("Files rejected", total.get("rejected", len(rejected) if rejected is not None else None)),
    ]
    rows += [(f"Kept from the {src} folder", n) for src, n in sources.items()]
    leak = (summary.get("leakage") or {}).get("test_leak")
    if leak is not None:
        rows.append(("Test images rejected as copies of training images", leak))
    parts.append(
        explain(
            "Every file found was decoded and measured; the clean stage then kept or rejected "
            "it. Rejected files never reach training or testing."
        )
    )
    tables = [f"<div><h3>Totals</h3>{key_value_table(rows, 'Files', 'Count')}</div>"]
    per_reason = summary.get("rejected_per_reason")
    if per_reason is None and rejected is not None:
        per_reason = _reason_counts(rejected)
    if per_reason:
        reason_rows = [
            (reason_label(r), n) for r, n in sorted(per_reason.items(), key=lambda x: -x[1])
        ]
        tables.append(
            f"<div><h3>Rejected, per reason</h3>{key_value_table(reason_rows, 'Reason', 'Files')}</div>"
        )
    parts.append(f'<div class="tables">{"".join(tables)}</div>')

    kept = summary.get("kept_per_class")
    if isinstance(kept, Mapping) and kept:
        rejected_per_class = summary.get("rejected_per_class") or {}
        parts.append("<h3>Class distribution</h3>")
        parts.append(
            explain(
                "How many images of each class were kept and how many rejected: a class much "
                "smaller than the others is learnt less well, and a class with many rejections "
                "may have a problem at its source."
            )
        )
        parts.append(class_chart(kept, rejected_per_class))
        counts = pd.DataFrame(
            {
                "Class": list(kept),
                "Kept": [kept[c] for c in kept],
                "Rejected": [rejected_per_class.get(c, 0) for c in kept],
            }
        )
        parts.append(f"<details><summary>Counts per class</summary>{table(counts)}</details>")

    near = summary.get("near_duplicates")
    if isinstance(near, Mapping):
        parts.append(near_duplicates_part(near))
    settings = summary.get("settings")
    if isinstance(settings, Mapping):
        parts.append("<h3>Cleaning settings</h3>")
        parts.append(
            explain(
                "The thresholds this run's cleaning used (the <code>clean</code> section of the configuration)."
            )
        )
        order = [k for k in CLEAN_SETTINGS if k in settings] + [
            k for k in settings if k not in CLEAN_SETTINGS
        ]
        rows = [(CLEAN_SETTINGS.get(k) or humanise(k), settings[k]) for k in order]
        parts.append(key_value_table(rows, "Setting", "Value"))
    parts.append("<h3>Examples of rejected images</h3>")
    parts.append(explain("A few rejected images of each reason, as the clean stage saw them."))
    parts.append(image(inputs, "rejected_examples", "Rejected images, one row per reason."))
    parts.append(rejected_examples_table(rejected, examples_per_reason))
    return section("cleaning", "\n".join(parts))


def near_duplicates_part(near: Mapping[str, Any]) -> str:
    """The near-duplicate statistics (linked sets, groups) and any unusually large linked set."""
    mode = near.get("mode")
    what = {
        "group": "kept, and every linked set stays on one side of the split and in one fold",
        "drop": "dropped but one image of each group",
        "off": "not looked for",
    }.get(str(mode), f"handled as {mode}")
    parts = [
        "<h3>Near duplicates</h3>",
        explain(
            "Images whose thumbnails are nearly the same (re-encodes, small shifts or resizes) "
            f"are linked; in this run they are {esc(what)}. Linked sets chain every link, "
            "groups are what the report shows: each member linked to its leader."
        ),
    ]
    rows = [(NEAR_DUPLICATES[k], near[k]) for k in NEAR_DUPLICATES if k in near]
    parts.append(key_value_table(rows, "Near duplicates", "Value"))
    large = near.get("large_components") or []
    if large:
        frame = pd.DataFrame(
            {
                "Linked set": [c.get("group") for c in large],
                "Images": [c.get("size") for c in large],
                "Examples": [", ".join(c.get("examples") or []) for c in large],
            }
        )
        parts.append(
            explain(
                "Linked sets holding over 1% of the kept images: worth a look, a chain of links "
                "may have joined images that are not duplicates."
            )
        )
        parts.append(table(frame))
    return "\n".join(parts)


def rejected_examples_table(rejected: pd.DataFrame | None, per_reason: int) -> str:
    """The first ``per_reason`` rejected files of each reason, with the detail given."""
    if rejected is None:
        return not_run("rejected.csv")
    if rejected.empty or "reason" not in rejected.columns:
        return note("No image was rejected.")
    columns = [c for c in ("reason", "relpath", "label", "source", "detail") if c in rejected]
    shown = rejected.groupby("reason", sort=True, group_keys=False).head(per_reason)
    shown = shown.sort_values("reason", kind="stable")[columns].copy()
    shown["reason"] = shown["reason"].map(reason_label)
    heading = f"<h3>Rejected files (up to {per_reason} per reason, of {len(rejected)})</h3>"
    intro = explain(
        "Rejected files by name, with the measurement that decided (the full list is "
        "<code>results/clean/rejected.csv</code>)."
    )
    return heading + intro + human_table(shown)


def augmentation_rows(augment: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The augmentation policy of the ``augment`` config section, one human row per part."""

    def span(values: Any, unit: str = "", off: tuple = (1.0, 1.0)) -> str:
        if not isinstance(values, list | tuple) or len(values) != 2:
            return _fmt(values)
        if tuple(float(v) for v in values) == off:
            return "off"
        return f"{_fmt(float(values[0]))}{unit} to {_fmt(float(values[1]))}{unit}"

    def plus_minus(value: Any, unit: str = "") -> str:
        return "off" if not value else f"± {_fmt(value)}{unit}"

    on_device = augment.get("on_device", True)
    copies = augment.get("copies", 0)
    return [
        (
            "Applied during training",
            "to every training batch on the training device, new draws every epoch"
            if on_device
            else "no (only the views materialised on disk)",
        ),
        ("Views materialised on disk per training image", f"{copies}" if copies else "none"),
        ("Random crop: share of the image area", span(augment.get("crop_area"))),
        (
            "Random crop: aspect ratio",
            "(crop off)"
            if span(augment.get("crop_area")) == "off"
            else span(augment.get("crop_ratio")),
        ),
        ("Zoom", span(augment.get("scale"), "×")),
        ("Rotation", plus_minus(augment.get("rotation"), "°")),
        (
            "Shift",
            "off"
            if not augment.get("translate")
            else f"up to {_fmt(100 * float(augment['translate']))}% of the side",
        ),
        ("Mirror left-right", "half of the images" if augment.get("hflip") else "off"),
        ("Mirror upside down", "half of the images" if augment.get("vflip") else "off"),
        ("Brightness", plus_minus(augment.get("brightness") and 100 * augment["brightness"], "%")),
        ("Contrast", plus_minus(augment.get("contrast") and 100 * augment["contrast"], "%")),
    ]


def augmentation_section(inputs: Mapping[str, Any]) -> str:
    """The augmentation policy as a table, and the augment stage's preview of draws of it."""
    config = read_yaml(inputs, "config") or {}
    parts = []
    augment = config.get("augment")
    if isinstance(augment, Mapping):
        parts.append(
            explain(
                "The random changes applied to training images so that the model sees new "
                "variants of them; validation, test and prediction images are never changed. "
                "Each image draws its own values within these limits."
            )
        )
        parts.append(key_value_table(augmentation_rows(augment), "Augmentation", "Setting"))
    parts.append(
        explain(
            "Each row of the preview: a training image, then independent random draws of "
            "the policy above. Every view should still clearly show its class."
        )
    )
    parts.append(
        image(
            inputs,
            "augment_preview",
            "Training images (first column) and random draws of the policy.",
        )
    )
    return section("augmentation", "\n".join(parts))


def sweep_section(inputs: Mapping[str, Any], max_rows: int) -> str:
    """Trials sorted by the validation metric, the winner (best.yaml) and the sweep plot."""
    trials = read_csv(inputs, "sweep_trials")
    if trials is None:
        return section("sweep", not_run("the sweep (sweep.enabled is false or it has not run)"))
    metric = sweep_metric(trials)
    order = "highest first" if metric and not metric.endswith("loss") else "lowest first"
    parts = [
        explain(
            f"{len(trials)} trials, each a model trained with one combination of the swept "
            "settings on the training images over its whole schedule. A trial's score is its "
            "<b>last</b> epoch's validation metric (the model at the end of the schedule, the one "
            "the final recipe reproduces), not its best epoch's. Sorted by "
            f"{esc(label(metric).lower() if metric else 'file order')} ({order}); a tie goes to "
            "the lower last-epoch validation loss (for a loss score: the higher accuracy), then "
            "to the trial listed first in the sweep."
        )
    ]
    shown = sorted_trials(trials).copy()
    if "best_epoch" in shown:
        shown["best_epoch"] = pd.to_numeric(shown["best_epoch"], errors="coerce") + 1
    swept = [c for c in shown.columns if c not in SWEEP_BOOKKEEPING]
    names = {c: config_label(c) for c in swept} | {
        c: label(c) for c in shown.columns if c in SWEEP_BOOKKEEPING
    }
    parts.append(table(shown.rename(columns=names), max_rows))
    best = read_yaml(inputs, "sweep_best")
    if best is not None:
        overrides = best.get("overrides") or {}
        settings = ", ".join(f"{config_label(k).lower()} {_fmt(v)}" for k, v in overrides.items())
        parts.append("<h3>Chosen settings</h3>")
        parts.append(
            explain(
                f"Trial <b>{esc(best.get('trial'))}</b> ({esc(settings or 'no override')}) won "
                f"with {esc(label(best.get('metric', '')).lower())} {esc(_fmt(best.get('score')))} "
                f"at the end of its {esc(best.get('epochs'))}-epoch schedule. The final model and "
                "the cross-validation folds train with these settings over the same whole "
                "schedule and keep its last epoch."
            )
        )
    parts.append(image(inputs, "sweep_plot", "Validation score of each trial, best first."))
    return section("sweep", "\n".join(parts))


def cv_section(inputs: Mapping[str, Any]) -> str:
    """Per-fold metrics and mean ± std."""
    summary = read_csv(inputs, "cv_summary")
    if summary is None or "fold" not in summary.columns:
        return section("cv", not_run("k-fold cross-validation"))
    mean, std = cv_row(summary, "mean") or {}, cv_row(summary, "std") or {}
    folds = summary[~summary["fold"].astype(str).isin(["mean", "std"])]
    items = "".join(
        f"<li>{esc(label(m))}: <b>{_fmt(mean[m])} ± {_fmt(std.get(m))}</b></li>" for m in mean
    )
    text = (
        f"The training images (never the test images) split into {len(folds)} folds that keep "
        "near duplicates together; each fold is scored by a model trained on the other folds "
        "with the final model's recipe. The spread over folds shows how much a score depends "
        "on which images happen to be held out."
    )
    if read_yaml(inputs, "sweep_best") is not None:
        text += (
            " The recipe itself was chosen by the sweep on the validation images, which lie "
            "inside this pool: every fold's held-out images include some of them, so the mean "
            "is slightly optimistic about the choice of settings."
        )
    intro = explain(text + " Mean ± sample standard deviation:")
    shown = summary.copy()
    shown["fold"] = shown["fold"].astype(str).replace({"mean": "Mean", "std": "Standard deviation"})
    return section("cv", intro + f"<ul>{items}</ul>" + human_table(shown))


def test_section(inputs: Mapping[str, Any]) -> str:
    """Test metrics, classes without test images, the confusion matrix and the per-class table."""
    metrics = read_json(inputs, "test_metrics")
    per_class = read_csv(inputs, "per_class")
    if metrics is None and per_class is None:
        return section("test", not_run("the test-set evaluation"))
    parts = []
    if metrics is not None:
        n_test = metrics.get("n_test")
        parts.append(
            explain(
                f"The final model on the {esc(_count(n_test))} held-out test images, which no "
                "training, sweep or model choice ever saw. Macro scores average the classes "
                "equally; balanced accuracy is the mean recall per class."
            )
        )
        order = [
            "accuracy",
            "balanced_accuracy",
            "f1_macro",
            "precision_macro",
            "recall_macro",
            "n_test",
            "classes_tested",
        ]
        rows = [(label(k), metrics[k]) for k in order if k in metrics]
        rows += [
            (label(k), v)
            for k, v in metrics.items()
            if k not in order and not isinstance(v, Mapping | list)
        ]
        parts.append(key_value_table(rows, "Test set", "Value"))
        parts.append(baselines_table(metrics))
        parts.append(exports_table(inputs, metrics))
        missing = metrics.get("classes_without_test_images")
        if isinstance(missing, list) and missing:
            parts.append(
                explain(
                    f"<b>Classes without test images</b> ({len(missing)}), not in the macro "
                    "scores: " + esc(", ".join(str(c) for c in missing)) + "."
                )
            )
        elif isinstance(missing, list):
            parts.append(explain("Every class has test images."))
    if metrics is not None and isinstance(metrics.get("calibration"), Mapping):
        parts.append(calibration_part(metrics["calibration"]))
    parts.append(
        explain(
            "Rows are the true classes, columns the predicted ones: off-diagonal cells are mistakes."
        )
    )
    parts.append(image(inputs, "confusion", "Confusion matrix on the test set."))
    parts.append("<h3>Per class</h3>")
    parts.append(
        explain(
            "Precision (of the images predicted as the class, the share right), recall (of the class's images, the share found) and F1 per class."
        )
    )
    parts.append(human_table(per_class) if per_class is not None else not_run("per_class.csv"))
    return section("test", "\n".join(parts))


def exports_table(inputs: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The exported models' accuracy on the same test images (float ONNX, int8 ONNX), when exported."""
    onnx = read_json(inputs, "export_onnx") or {}
    int8 = ((read_json(inputs, "export_int8") or {}).get("quantization") or {}).get("test") or {}
    float_test = onnx.get("test") or {}
    if not float_test and not int8:
        return ""
    rows = [("PyTorch (model.ckpt)", [metrics.get("accuracy"), None, metrics.get("n_test")])]
    if float_test:
        rows.append(
            (
                "ONNX float (model.onnx)",
                [float_test.get("accuracy"), None, float_test.get("images")],
            )
        )
    if int8:
        rows.append(
            (
                "ONNX int8 (model.int8.onnx)",
                [int8.get("accuracy_int8"), int8.get("label_agreement"), int8.get("images")],
            )
        )
    text = (
        "<b>Exported models</b> (<code>snakemake export</code>) on the same test images: "
        "the int8 file is the float graph quantised (static, calibrated on training images) "
        "for the CPU; label agreement is the share of test images where int8 and float "
        "predict the same class."
    )
    headers = ["", "Accuracy", "Label agreement with float", "Test images"]
    return explain(text) + row_table(rows, headers)


def calibration_part(calibration: Mapping[str, Any]) -> str:
    """The calibration numbers (ECE, NLL before and after the temperature) and the reliability diagram."""
    n = calibration.get("n")
    bins = calibration.get("bins")
    text = (
        "<b>Calibrated probabilities.</b> Every probability imgpipe writes is "
        f"softmax(logits / T) with T = {esc(_fmt(calibration.get('temperature')))}, fitted by "
        "minimising the negative log-likelihood on "
        f"{esc(calibration.get('fitted_on', 'images the model did not train on'))}; "
        "T only rescales the logits, so every prediction (and accuracy) is unchanged. "
        f"Measured on the {esc(_count(n))} test images: expected calibration error (ECE, "
        f"{esc(bins)} equal-width confidence bins: the mean gap between confidence and "
        "accuracy, weighted by the images in each bin) and negative log-likelihood (NLL), "
        "before (T = 1) and after."
    )
    rows = [
        (label, [calibration.get(f"{key}_before"), calibration.get(f"{key}_after")])
        for key, label in (
            ("ece", "Expected calibration error"),
            ("nll", "Negative log-likelihood"),
        )
    ]
    parts = [explain(text), row_table(rows, ["", "Before (T = 1)", "After"])]
    reliability = calibration.get("reliability")
    if isinstance(reliability, Mapping):
        caption = (
            f"Reliability diagram on the {_count(n)} test images: mean confidence against "
            "accuracy per confidence bin, before and after the temperature (the diagonal is "
            "a perfectly calibrated model; a marker's size follows its bin's images)."
        )
        parts.append(figure(reliability_chart(reliability), caption))
    return "\n".join(parts)


def reliability_chart(reliability: Mapping[str, Any]) -> str:
    """Confidence against accuracy per bin, before and after calibration, with the diagonal."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, colour in (("before", "#c44e52"), ("after", "#4c72b0")):
        table = pd.DataFrame(reliability.get(name) or [])
        if table.empty or "count" not in table:
            continue
        table = table[table["count"] > 0]
        ax.plot(table["confidence"], table["accuracy"], color=colour, linewidth=1)
        sizes = 20 + 180 * table["count"] / max(1, table["count"].max())
        ax.scatter(table["confidence"], table["accuracy"], s=sizes, color=colour, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return chart(fig)


def baselines_table(metrics: Mapping[str, Any]) -> str:
    """The model beside the majority class and the linear model on pixels, on the same test images."""
    baselines = metrics.get("baselines")
    if not isinstance(baselines, Mapping):
        return ""
    keys = ("accuracy", "balanced_accuracy", "f1_macro")
    rows = [("This model", [metrics.get(k) for k in keys])]
    for name, title in (("majority", "Majority class"), ("linear_pixels", "Linear on pixels")):
        scores = baselines.get(name) or {}
        if scores.get("skipped"):
            rows.append((title, [f"skipped: {scores['skipped']}"] + [None] * (len(keys) - 1)))
        else:
            rows.append((title, [scores.get(k) for k in keys]))
    majority = (baselines.get("majority") or {}).get("class")
    linear = baselines.get("linear_pixels") or {}
    text = (
        "<b>Baselines</b> on the same test images, fitted on the final model's training "
        "images: always predicting the most common training class"
        + (f" (<code>{esc(majority)}</code>)" if majority else "")
        + ", and logistic regression on the pixels"
    )
    if not linear.get("skipped"):
        text += (
            f" (downsampled to {esc(linear.get('size'))} px and standardised, fitted on "
            f"{esc(_count(linear.get('n_train_used')))} of the "
            f"{esc(_count(linear.get('n_train')))} training images)"
        )
    text += ". A model worth using beats both."
    headers = ["", *(label(k) for k in keys)]
    return explain(text) + row_table(rows, headers)


def training_histories(inputs: Mapping[str, Any]) -> list[tuple[str, pd.DataFrame]]:
    """(name, per-epoch history) of the winning trial, each fold and the final model, when present."""
    found = []
    histories = inputs.get("trial_histories") or []
    best = (read_yaml(inputs, "sweep_best") or {}).get("trial")
    if best is None and (trials := read_csv(inputs, "sweep_trials")) is not None and len(trials):
        best = sorted_trials(trials).iloc[0].get("trial")
    for path in histories:
        if best is not None and Path(path).parent.name == str(best) and Path(path).is_file():
            found.append((f"best trial {best}", _read_table(Path(path))))
    for k, path in enumerate(inputs.get("fold_histories") or []):
        if Path(path).is_file():
            found.append((f"fold {k}", _read_table(Path(path))))
    final = _existing(inputs, "final_history")
    if final is not None:
        found.append(("final model", _read_table(final)))
    return [(name, h) for name, h in found if "epoch" in h and len(h)]


def curves_chart(histories: Sequence[tuple[str, pd.DataFrame]]) -> str:
    """Loss per epoch of every job (training solid, validation dashed) and validation accuracy."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    has_accuracy = [("val_acc" in h and h["val_acc"].notna().any()) for _, h in histories]
    panels = 2 if any(has_accuracy) else 1  # no empty accuracy panel
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for k, (name, history) in enumerate(histories):
        colour = "black" if name == "final model" else colours[k % len(colours)]
        epochs = history["epoch"].astype(int) + 1
        style = {"marker": "o", "ms": 3, "color": colour}
        if "train_loss" in history:
            axes[0][0].plot(epochs, history["train_loss"], label=f"{name}, training", **style)
        if "val_loss" in history and history["val_loss"].notna().any():
            axes[0][0].plot(
                epochs, history["val_loss"], ls="--", label=f"{name}, validation", **style
            )
        if has_accuracy[k]:
            axes[0][1].plot(epochs, history["val_acc"], ls="--", label=name, **style)
    axes[0][0].set_title("loss")
    axes[0][0].set_ylabel("loss")
    if panels == 2:
        axes[0][1].set_title("validation accuracy")
        axes[0][1].set_ylabel("accuracy")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return chart(fig)


def training_section(inputs: Mapping[str, Any]) -> str:
    """Loss and validation accuracy per epoch of the winning trial, the folds and the final model."""
    histories = training_histories(inputs)
    if not histories:
        return section("training", not_run("the training histories"))
    validated = [name for name, h in histories if "val_loss" in h and h["val_loss"].notna().any()]
    unvalidated = [name for name, h in histories if name not in validated]
    text = (
        "Loss per epoch on the training images (solid) and the validation images (dashed), "
        "and validation accuracy. A validation curve that turns up while the training curve "
        "keeps falling means over-fitting."
    )
    if validated:
        text += f" With validation: {esc(', '.join(validated))}."
    if unvalidated:
        text += (
            f" Without validation: {esc(', '.join(unvalidated))}, which train on all their "
            "images over the sweep winner's whole schedule."
        )
    parts = [explain(text)]
    parts.append(
        figure(curves_chart(histories), "Training and validation curves of each training job.")
    )
    schedule = schedule_table(inputs)
    if schedule is not None:
        parts.append(
            explain(
                "The schedule each job ran: batch size, optimizer steps per epoch, epochs and "
                "steps in all. Every job is sized on the training pool (train.batch_size auto, "
                "train.min_steps): they share the batch size and the epochs, and their steps "
                "differ only with their number of images."
            )
        )
        parts.append(table(schedule))
    parts.append(
        explain(
            "Every training job also logged to TensorBoard: <code>make tensorboard</code> (or "
            "<code>tensorboard --logdir results/tensorboard</code>) shows each trial, fold and "
            "the final model, and its HParams tab compares the trials' settings side by side."
        )
    )
    return section("training", "\n".join(parts))


SCHEDULE_COLUMNS = {
    "train_images": "Training images",
    "batch_size": "Batch size",
    "steps_per_epoch": "Steps per epoch",
    "epochs": "Epochs",
    "steps": "Steps",
}


def schedule_table(inputs: Mapping[str, Any]) -> pd.DataFrame | None:
    """One row per training job (trials, folds, final model) with its batch size, steps and epochs."""
    named = [(Path(p).parent.name, p) for p in inputs.get("trial_summaries") or []]
    named += [(f"fold {k}", p) for k, p in enumerate(inputs.get("fold_summaries") or [])]
    if inputs.get("final_summary"):
        named.append(("final model", inputs["final_summary"]))
    rows = []
    for name, path in named:
        if not Path(path).is_file():
            continue
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
        if "steps" not in summary:  # a skipped fold, or a summary of an older version
            continue
        rows.append(
            {"job": name, **{label: summary.get(key) for key, label in SCHEDULE_COLUMNS.items()}}
        )
    return pd.DataFrame(rows) if rows else None


def suspects_section(inputs: Mapping[str, Any], max_rows: int) -> str:
    """Images whose out-of-fold prediction disagrees with their label, as ranked by the cv stage."""
    suspects = read_csv(inputs, "suspects")
    if suspects is None:
        return section("suspects", not_run("the suspect-label search"))
    parts = [
        explain(
            "Images whose out-of-fold prediction (by a fold model that never trained on them) "
            "contradicts the given label, most suspect first: worth a look by a person, and a "
            "fix of the label, before the next run."
        ),
        human_table(suspects, max_rows) if not suspects.empty else note("No suspect label."),
        image(
            inputs, "suspects_png", "The most suspect images with their given and suggested labels."
        ),
    ]
    return section("suspects", "\n".join(parts))


def clusters_section(inputs: Mapping[str, Any]) -> str:
    """Cluster scores side by side, each space's scores per role, its montage and scatter."""
    features = cluster_features(inputs)
    if not features:
        return section("clusters", not_run("clustering"))
    metrics = {name: read_json(inputs, f"cluster_{name}_metrics") for name in features}
    scored = {name: (m or {}).get("scored_on", "all") for name, m in metrics.items()}
    on_test = any(where == "test" for where in scored.values())
    parts = [
        explain(
            "K-means groups the images without looking at a label; the scores say how well the "
            "groups match the classes (1 is perfect; Hungarian accuracy matches each cluster to "
            "one class). "
            + (
                "The headline scores are on the <b>test images</b>, which the model whose "
                "embeddings are clustered never trained on: on its training images the "
                "embeddings separate the classes almost by construction."
                if on_test
                else "The scores are over all images."
            )
        )
    ]
    shown = [name for name in features if metrics.get(name) is not None]
    if shown:
        rows = [
            (label(key), [_cluster_value(key, metrics[name].get(key)) for name in shown])
            for key in CLUSTER_ROWS
        ]
        headers = ["Score", *(FEATURES.get(name, humanise(name)) for name in shown)]
        parts.append(row_table(rows, headers))
    else:
        parts.append(not_run("cluster metrics"))
    for name in features:
        parts.append(f"<h3>{esc(FEATURES.get(name, humanise(name)))}</h3>")
        by_role = (metrics.get(name) or {}).get("by_role")
        if isinstance(by_role, Mapping) and by_role:
            roles = [r for r in ROLES if r in by_role] + [r for r in by_role if r not in ROLES]
            rows = [
                (
                    ROLES.get(role, humanise(role)),
                    [by_role[role].get(c) for c in CLUSTER_ROLE_COLUMNS],
                )
                for role in roles
                if isinstance(by_role[role], Mapping)
            ]
            parts.append(
                explain(
                    "The same clustering scored on the images of each role of the split, and "
                    "on all of them together."
                )
            )
            parts.append(row_table(rows, ["Images", *(label(c) for c in CLUSTER_ROLE_COLUMNS)]))
        figures = image(
            inputs, f"cluster_{name}_montage", "Sample images of each cluster, one row per cluster."
        )
        figures += image(
            inputs,
            f"cluster_{name}_scatter",
            "The images projected to two dimensions, coloured by cluster.",
        )
        parts.append(f'<div class="figures">{figures}</div>')
    return section("clusters", "\n".join(parts))


def _cluster_value(key: str, value: Any) -> Any:
    return ROLES.get(str(value), value) if key == "scored_on" else value


def config_section(inputs: Mapping[str, Any]) -> str:
    """The effective configuration of the run (results/config.yaml)."""
    text = read_text(inputs, "config")
    if text is None:
        return section("config", not_run("the configuration snapshot"))
    intro = explain(
        "The configuration this run used, defaults filled in (<code>results/config.yaml</code>); "
        "copy it to repeat the run."
    )
    return section("config", intro + f"<pre>{esc(text)}</pre>")


# ----------------------------------------------------------------------------- page


def render_page(
    inputs: Mapping[str, Any],
    title: str = "imgpipe report",
    examples_per_reason: int = 8,
    max_rows: int = 25,
    runs: pd.DataFrame | None = None,
    current_run: str | None = None,
) -> str:
    """The whole self-contained HTML page for the named input files (and the run log, if given)."""
    numbers = headline(inputs, title)
    body = [
        overview_section(numbers, inputs),
        runs_section(runs, current_run, max_rows),
        cleaning_section(inputs, examples_per_reason, max_rows),
        augmentation_section(inputs),
        sweep_section(inputs, max_rows),
        cv_section(inputs),
        test_section(inputs),
        training_section(inputs),
        suspects_section(inputs, max_rows),
        clusters_section(inputs),
        config_section(inputs),
    ]
    toc = "".join(f'<li><a href="#{sid}">{esc(name)}</a></li>' for sid, name in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{esc(title)}</h1>\n<nav><ol>{toc}</ol></nav>\n"
        + "\n".join(body)
        + '\n<div id="imgcheck"></div>\n'
        f"<script>{IMAGE_CHECK}</script>\n</main>\n</body>\n</html>\n"
    )


def write_report(
    inputs: Mapping[str, Any],
    html_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    options: Mapping[str, Any],
    runs_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write index.html and summary.json (and log the run in ``runs_path``); return the numbers."""
    title = options.get("title", "imgpipe report")
    numbers = headline(inputs, title)
    runs, current = record_run(inputs, numbers, runs_path) if runs_path else (None, None)
    page = render_page(
        inputs,
        title=title,
        examples_per_reason=int(options.get("examples_per_reason", 8)),
        max_rows=int(options.get("max_rows", 25)),
        runs=runs,
        current_run=current,
    )
    # A file name that is not UTF-8 (kept byte for byte in the CSVs) is shown as \xNN.
    write_text(printable(page), html_path)
    write_text(printable(json.dumps(numbers, indent=2, ensure_ascii=False)) + "\n", summary_path)
    return numbers


def run_report(job: StageJob) -> dict[str, Any]:
    """The report stage: index.html and summary.json from every result file; this run in runs.csv."""
    inputs = {
        name: str(value) if isinstance(value, str | os.PathLike) else [str(v) for v in value]
        for name, value in job.input.items()
    }
    numbers = write_report(
        inputs,
        job.output["html"],
        job.output["summary"],
        job.params["report"],
        runs_path=job.params.get("runs"),
    )
    log.info("wrote %s and %s", job.output["html"], job.output["summary"])
    log.info("headline numbers: %s", numbers)
    warning = (numbers.get("test") or {}).get("warning")
    if warning:  # the run's last job: the warning is its last line on the terminal too
        from imgpipe.core.logs import TERMINAL

        log.warning("%s; see %s#overview", warning, job.output["html"], extra={TERMINAL: True})
    return numbers
