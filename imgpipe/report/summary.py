"""The headline numbers (results/report/summary.json): pure functions of the report's input files.

``inputs`` is the mapping the report rule passes (input name -> path, or a list
of paths); every input is optional: an absent file reads as None.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from imgpipe.core.atomic import plain
from imgpipe.core.atomic import read_csv as read_table_file

SWEEP_BOOKKEEPING = {"trial", "val_acc", "val_loss", "best_epoch", "epochs", "steps", "seconds"}
CV_METRICS = ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro")
CLUSTER_HEADLINE = ("hungarian_accuracy", "nmi", "ari", "silhouette")
CLUSTER_KEY = re.compile(r"^cluster_(?P<features>.+)_(?P<kind>metrics|montage|scatter)$")


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
    """The ``mean`` or ``std`` row of cv/summary.csv as the cv stage wrote it (None without one)."""
    rows = summary[summary["fold"].astype(str) == name]
    if rows.empty:
        return None
    metrics = [c for c in summary.columns if c != "fold"]
    return {c: plain(pd.to_numeric(rows.iloc[0][c], errors="coerce")) for c in metrics}


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
