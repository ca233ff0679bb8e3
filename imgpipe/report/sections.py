"""The page's sections about the run and its data: overview, runs, cleaning, augmentation, config.

Each function gathers what its section shows from the input files and renders
its template (``templates/sections/<id>.html.j2``) inside :func:`section`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pandas as pd
from markupsafe import Markup

from imgpipe.core.plots import class_counts_png
from imgpipe.report.labels import (
    CLEAN_SETTINGS,
    NEAR_DUPLICATES,
    humanise,
    label,
    reason_label,
)
from imgpipe.report.ledger import RUN_COLUMNS
from imgpipe.report.pieces import (
    _count,
    _fmt,
    data_uri,
    figure,
    human_table,
    image,
    key_value_table,
    not_run,
    note,
    render,
    section,
    table,
)
from imgpipe.report.summary import _reason_counts, read_csv, read_json, read_text, read_yaml

# Most classes drawn in the class-distribution chart (the largest; the table lists all).
MAX_CHART_CLASSES = 40
RUNS_HEADERS = (
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
)


def overview_section(numbers: Mapping[str, Any], inputs: Mapping[str, Any]) -> Markup:
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
    body = render(
        "sections/overview.html.j2",
        tiles=tiles,
        # The block at the top of the page when the model does not beat its baselines.
        warning=bool(test.get("warning")),
        shortfalls=" and its ".join(test.get("shortfalls") or []),
        causes=test.get("warning_causes") or [],
    )
    return section("overview", body)


def beside_baselines(baselines: Mapping[str, Any] | None, metric: str) -> str:
    """`` — majority class 0.374, linear on pixels 0.63``: a tile's reference points (empty without)."""
    parts = [
        f"{name} {_fmt(value)}"
        for name, short in (("majority class", "majority"), ("linear on pixels", "linear"))
        if (value := (baselines or {}).get(f"baseline_{short}_{metric}")) is not None
        and value == value
    ]
    return " — " + ", ".join(parts) if parts else ""


def runs_section(runs: pd.DataFrame | None, current: str | None, max_rows: int) -> Markup:
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
        rows.append((str(run.get("run_id")) == current, [_fmt(c) for c in cells]))
    body = render(
        "sections/runs.html.j2",
        headers=RUNS_HEADERS,
        rows=rows,
        total=len(runs),
        max_rows=max_rows,
    )
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


def cleaning_section(inputs: Mapping[str, Any], examples_per_reason: int, max_rows: int) -> Markup:
    """Totals, the class distribution chart, rejections per reason, near duplicates, settings, examples."""
    summary = read_json(inputs, "clean_summary")
    rejected = read_csv(inputs, "rejected")
    if summary is None and rejected is None:
        return section("cleaning", not_run("the clean stage"))
    summary = summary or {}
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
    per_reason = summary.get("rejected_per_reason")
    if per_reason is None and rejected is not None:
        per_reason = _reason_counts(rejected)
    reason_rows = [
        (reason_label(r), n) for r, n in sorted((per_reason or {}).items(), key=lambda x: -x[1])
    ]
    kept = summary.get("kept_per_class")
    class_figure = counts = None
    if isinstance(kept, Mapping) and kept:
        rejected_per_class = summary.get("rejected_per_class") or {}
        class_figure = class_chart(kept, rejected_per_class)
        counts = table(
            pd.DataFrame(
                {
                    "Class": list(kept),
                    "Kept": [kept[c] for c in kept],
                    "Rejected": [rejected_per_class.get(c, 0) for c in kept],
                }
            )
        )
    near = summary.get("near_duplicates")
    settings = summary.get("settings")
    examples_table, examples_note = rejected_examples_table(rejected, examples_per_reason)
    body = render(
        "sections/cleaning.html.j2",
        totals=key_value_table(rows, "Files", "Count"),
        reasons=key_value_table(reason_rows, "Reason", "Files") if per_reason else None,
        class_figure=class_figure,
        counts=counts,
        near=near_duplicates_part(near) if isinstance(near, Mapping) else None,
        settings=settings_table(settings) if isinstance(settings, Mapping) else None,
        examples_figure=image(inputs, "rejected_examples", "Rejected images, one row per reason."),
        examples_table=examples_table,
        examples_note=examples_note,
        per_reason=examples_per_reason,
        n_rejected=len(rejected) if rejected is not None else 0,
    )
    return section("cleaning", body)


def class_chart(kept: Mapping[str, Any], rejected: Mapping[str, Any]) -> Markup:
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
    return figure(data_uri(class_counts_png(counts)), caption + ".")


def settings_table(settings: Mapping[str, Any]) -> Markup:
    """The cleaning thresholds, in the documented order, under human names."""
    order = [k for k in CLEAN_SETTINGS if k in settings] + [
        k for k in settings if k not in CLEAN_SETTINGS
    ]
    rows = [(CLEAN_SETTINGS.get(k) or humanise(k), settings[k]) for k in order]
    return key_value_table(rows, "Setting", "Value")


def near_duplicates_part(near: Mapping[str, Any]) -> dict[str, Any]:
    """The near-duplicate handling in words, its statistics and any unusually large linked set."""
    mode = near.get("mode")
    what = {
        "group": "kept, and every linked set stays on one side of the split and in one fold",
        "drop": "dropped but one image of each group",
        "off": "not looked for",
    }.get(str(mode), f"handled as {mode}")
    rows = [(NEAR_DUPLICATES[k], near[k]) for k in NEAR_DUPLICATES if k in near]
    large = near.get("large_components") or []
    frame = pd.DataFrame(
        {
            "Linked set": [c.get("group") for c in large],
            "Images": [c.get("size") for c in large],
            "Examples": [", ".join(c.get("examples") or []) for c in large],
        }
    )
    return {
        "what": what,
        "table": key_value_table(rows, "Near duplicates", "Value"),
        "large": table(frame) if large else None,
    }


def rejected_examples_table(
    rejected: pd.DataFrame | None, per_reason: int
) -> tuple[Markup | None, Markup | None]:
    """(table, None) of the first ``per_reason`` rejected files of each reason, or (None, a note)."""
    if rejected is None:
        return None, not_run("rejected.csv")
    if rejected.empty or "reason" not in rejected.columns:
        return None, note("No image was rejected.")
    columns = [c for c in ("reason", "relpath", "label", "source", "detail") if c in rejected]
    shown = rejected.groupby("reason", sort=True, group_keys=False).head(per_reason)
    shown = shown.sort_values("reason", kind="stable")[columns].copy()
    shown["reason"] = shown["reason"].map(reason_label)
    return human_table(shown), None


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

    on_device = augment["on_device"]  # the run's config snapshot: defaults filled in
    copies = augment["copies"]
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


def augmentation_section(inputs: Mapping[str, Any]) -> Markup:
    """The augmentation policy as a table, and the augment stage's preview of draws of it."""
    augment = (read_yaml(inputs, "config") or {}).get("augment")
    body = render(
        "sections/augmentation.html.j2",
        policy=(
            key_value_table(augmentation_rows(augment), "Augmentation", "Setting")
            if isinstance(augment, Mapping)
            else None
        ),
        preview=image(
            inputs,
            "augment_preview",
            "Training images (first column) and random draws of the policy.",
        ),
    )
    return section("augmentation", body)


def config_section(inputs: Mapping[str, Any]) -> Markup:
    """The effective configuration of the run (results/config.yaml)."""
    text = read_text(inputs, "config")
    if text is None:
        return section("config", not_run("the configuration snapshot"))
    return section("config", render("sections/config.html.j2", text=text))
