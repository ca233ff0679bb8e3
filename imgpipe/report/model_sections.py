"""The page's sections about the models: sweep, cross-validation, test set, training, suspects, clusters.

Each function gathers what its section shows from the input files and renders
its template (``templates/sections/<id>.html.j2``) inside :func:`section`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from markupsafe import Markup

from imgpipe.core.plots import reliability_png, training_curves_png
from imgpipe.learn.monitor import metric_mode
from imgpipe.report.labels import FEATURES, ROLES, config_label, humanise, label
from imgpipe.report.pieces import (
    _count,
    _fmt,
    data_uri,
    figure,
    formatted,
    human_table,
    image,
    key_value_table,
    not_run,
    render,
    section,
    table,
)
from imgpipe.report.summary import (
    SWEEP_BOOKKEEPING,
    _existing,
    _read_table,
    cluster_features,
    cv_row,
    read_csv,
    read_json,
    read_yaml,
    sorted_trials,
    sweep_metric,
)

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
# The test metrics in the order the test table lists them (others follow).
TEST_ORDER = (
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "precision_macro",
    "recall_macro",
    "n_test",
    "classes_tested",
)
SCHEDULE_COLUMNS = {
    "train_images": "Training images",
    "batch_size": "Batch size",
    "steps_per_epoch": "Steps per epoch",
    "epochs": "Epochs",
    "steps": "Steps",
}


def sweep_section(inputs: Mapping[str, Any], max_rows: int) -> Markup:
    """Trials sorted by the validation metric, the winner (best.yaml) and the sweep plot."""
    trials = read_csv(inputs, "sweep_trials")
    if trials is None:
        return section("sweep", not_run("the sweep (sweep.enabled is false or it has not run)"))
    metric = sweep_metric(trials)
    shown = sorted_trials(trials).copy()
    if "best_epoch" in shown:
        shown["best_epoch"] = pd.to_numeric(shown["best_epoch"], errors="coerce") + 1
    swept = [c for c in shown.columns if c not in SWEEP_BOOKKEEPING]
    names = {c: config_label(c) for c in swept} | {
        c: label(c) for c in shown.columns if c in SWEEP_BOOKKEEPING
    }
    best = read_yaml(inputs, "sweep_best")
    chosen = None
    if best is not None:
        overrides = best.get("overrides") or {}
        settings = ", ".join(f"{config_label(k).lower()} {_fmt(v)}" for k, v in overrides.items())
        chosen = {
            "trial": best.get("trial"),
            "settings": settings or "no override",
            "metric": label(best.get("metric", "")).lower(),
            "score": _fmt(best.get("score")),
            "epochs": best.get("epochs"),
        }
    body = render(
        "sections/sweep.html.j2",
        n_trials=len(trials),
        metric=label(metric).lower() if metric else "file order",
        order="highest first" if metric and metric_mode(metric) == "max" else "lowest first",
        trials=table(shown.rename(columns=names), max_rows),
        best=chosen,
        plot=image(inputs, "sweep_plot", "Validation score of each trial, best first."),
    )
    return section("sweep", body)


def cv_section(inputs: Mapping[str, Any]) -> Markup:
    """Per-fold metrics and mean ± std, as the cv stage wrote them."""
    summary = read_csv(inputs, "cv_summary")
    if summary is None or "fold" not in summary.columns:
        return section("cv", not_run("k-fold cross-validation"))
    mean, std = cv_row(summary, "mean") or {}, cv_row(summary, "std") or {}
    folds = summary[~summary["fold"].astype(str).isin(["mean", "std"])]
    shown = summary.copy()
    shown["fold"] = shown["fold"].astype(str).replace({"mean": "Mean", "std": "Standard deviation"})
    body = render(
        "sections/cv.html.j2",
        n_folds=len(folds),
        swept=read_yaml(inputs, "sweep_best") is not None,
        scores=[(label(m), _fmt(mean[m]), _fmt(std.get(m))) for m in mean],
        folds=human_table(shown),
    )
    return section("cv", body)


def test_section(inputs: Mapping[str, Any]) -> Markup:
    """Test metrics, classes without test images, the confusion matrix and the per-class table."""
    metrics = read_json(inputs, "test_metrics")
    per_class = read_csv(inputs, "per_class")
    if metrics is None and per_class is None:
        return section("test", not_run("the test-set evaluation"))
    context: dict[str, Any] = {"metrics": metrics is not None, "calibration": None}
    if metrics is not None:
        rows = [(label(k), metrics[k]) for k in TEST_ORDER if k in metrics]
        rows += [
            (label(k), v)
            for k, v in metrics.items()
            if k not in TEST_ORDER and not isinstance(v, Mapping | list)
        ]
        missing = metrics.get("classes_without_test_images")
        context |= {
            "n_test": _count(metrics.get("n_test")),
            "scores": key_value_table(rows, "Test set", "Value"),
            "baselines": baselines_part(metrics),
            "exports": exports_rows(inputs, metrics),
            "untested": [str(c) for c in missing] if isinstance(missing, list) else None,
        }
        if isinstance(metrics.get("calibration"), Mapping):
            context["calibration"] = calibration_part(metrics["calibration"])
    context["confusion"] = image(inputs, "confusion", "Confusion matrix on the test set.")
    context["per_class"] = (
        human_table(per_class) if per_class is not None else not_run("per_class.csv")
    )
    return section("test", render("sections/test.html.j2", **context))


def exports_rows(
    inputs: Mapping[str, Any], metrics: Mapping[str, Any]
) -> list[tuple[str, list[str]]] | None:
    """The exported models' accuracy on the same test images (float ONNX, int8 ONNX), when exported."""
    onnx = read_json(inputs, "export_onnx") or {}
    int8 = ((read_json(inputs, "export_int8") or {}).get("quantization") or {}).get("test") or {}
    float_test = onnx.get("test") or {}
    if not float_test and not int8:
        return None
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
    return formatted(rows)


def calibration_part(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration numbers (ECE, NLL before and after the temperature) and the reliability diagram."""
    n = calibration.get("n")
    rows = [
        (name, [calibration.get(f"{key}_before"), calibration.get(f"{key}_after")])
        for key, name in (
            ("ece", "Expected calibration error"),
            ("nll", "Negative log-likelihood"),
        )
    ]
    reliability = calibration.get("reliability")
    diagram = None
    if isinstance(reliability, Mapping):
        caption = (
            f"Reliability diagram on the {_count(n)} test images: mean confidence against "
            "accuracy per confidence bin, before and after the temperature (the diagonal is "
            "a perfectly calibrated model; a marker's size follows its bin's images)."
        )
        diagram = figure(data_uri(reliability_png(reliability)), caption)
    return {
        "temperature": _fmt(calibration.get("temperature")),
        "fitted_on": calibration.get("fitted_on", "images the model did not train on"),
        "n": _count(n),
        "bins": calibration.get("bins"),
        "rows": formatted(rows),
        "figure": diagram,
    }


def baselines_part(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model beside the majority class and the linear model on pixels, on the same test images."""
    baselines = metrics.get("baselines")
    if not isinstance(baselines, Mapping):
        return None
    keys = ("accuracy", "balanced_accuracy", "f1_macro")
    rows = [("This model", [metrics.get(k) for k in keys])]
    for name, title in (("majority", "Majority class"), ("linear_pixels", "Linear on pixels")):
        scores = baselines.get(name) or {}
        if scores.get("skipped"):
            rows.append((title, [f"skipped: {scores['skipped']}"] + [None] * (len(keys) - 1)))
        else:
            rows.append((title, [scores.get(k) for k in keys]))
    linear = baselines.get("linear_pixels") or {}
    return {
        "majority": (baselines.get("majority") or {}).get("class"),
        "linear": None
        if linear.get("skipped")
        else {
            "size": linear.get("size"),
            "used": _count(linear.get("n_train_used")),
            "train": _count(linear.get("n_train")),
        },
        "headers": ["", *(label(k) for k in keys)],
        "rows": formatted(rows),
    }


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


def training_section(inputs: Mapping[str, Any]) -> Markup:
    """Loss and validation accuracy per epoch of the winning trial, the folds and the final model."""
    histories = training_histories(inputs)
    if not histories:
        return section("training", not_run("the training histories"))
    validated = [name for name, h in histories if "val_loss" in h and h["val_loss"].notna().any()]
    schedule = schedule_table(inputs)
    body = render(
        "sections/training.html.j2",
        validated=validated,
        unvalidated=[name for name, h in histories if name not in validated],
        curves=figure(
            data_uri(training_curves_png(histories)),
            "Training and validation curves of each training job.",
        ),
        schedule=table(schedule) if schedule is not None else None,
    )
    return section("training", body)


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


def suspects_section(inputs: Mapping[str, Any], max_rows: int) -> Markup:
    """Images whose out-of-fold prediction disagrees with their label, as ranked by the cv stage."""
    suspects = read_csv(inputs, "suspects")
    if suspects is None:
        return section("suspects", not_run("the suspect-label search"))
    body = render(
        "sections/suspects.html.j2",
        suspects=human_table(suspects, max_rows) if not suspects.empty else None,
        figure=image(
            inputs, "suspects_png", "The most suspect images with their given and suggested labels."
        ),
    )
    return section("suspects", body)


def clusters_section(inputs: Mapping[str, Any]) -> Markup:
    """Cluster scores side by side, each space's scores per role, its montage and scatter."""
    features = cluster_features(inputs)
    if not features:
        return section("clusters", not_run("clustering"))
    metrics = {name: read_json(inputs, f"cluster_{name}_metrics") for name in features}
    scored = {name: (m or {}).get("scored_on", "all") for name, m in metrics.items()}
    shown = [name for name in features if metrics.get(name) is not None]
    scores = None
    if shown:
        rows = [
            (label(key), [_cluster_value(key, metrics[name].get(key)) for name in shown])
            for key in CLUSTER_ROWS
        ]
        headers = ["Score", *(_space_name(name) for name in shown)]
        scores = {"headers": headers, "rows": formatted(rows)}
    body = render(
        "sections/clusters.html.j2",
        on_test=any(where == "test" for where in scored.values()),
        scores=scores,
        spaces=[_space(inputs, name, metrics.get(name)) for name in features],
    )
    return section("clusters", body)


def _space_name(name: str) -> str:
    return FEATURES.get(name, humanise(name))


def _space(inputs: Mapping[str, Any], name: str, metrics: Mapping | None) -> dict[str, Any]:
    """One feature space's scores per role of the split and its montage and scatter figures."""
    by_role = (metrics or {}).get("by_role")
    roles = None
    if isinstance(by_role, Mapping) and by_role:
        order = [r for r in ROLES if r in by_role] + [r for r in by_role if r not in ROLES]
        roles = formatted(
            [
                (
                    ROLES.get(role, humanise(role)),
                    [by_role[role].get(c) for c in CLUSTER_ROLE_COLUMNS],
                )
                for role in order
                if isinstance(by_role[role], Mapping)
            ]
        )
    figures = image(
        inputs, f"cluster_{name}_montage", "Sample images of each cluster, one row per cluster."
    ) + image(
        inputs,
        f"cluster_{name}_scatter",
        "The images projected to two dimensions, coloured by cluster.",
    )
    return {
        "name": _space_name(name),
        "roles": roles,
        "headers": ["Images", *(label(c) for c in CLUSTER_ROLE_COLUMNS)],
        "figures": figures,
    }


def _cluster_value(key: str, value: Any) -> Any:
    return ROLES.get(str(value), value) if key == "scored_on" else value
