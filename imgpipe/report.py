"""The results page: one self-contained HTML file, plus a JSON of the headline numbers.

Every input is optional at render time: a missing file (sweep disabled, a
cluster feature space not configured, a stage that has not run) becomes a short
"not run" note in its section, never an error. Text taken from the data goes
through ``html.escape`` (or pandas' escaping ``to_html``); images are embedded
as base64 data URIs, so the page makes no request of its own.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from imgpipe.atomic import plain, write_text
from imgpipe.stage import StageJob

log = logging.getLogger("imgpipe")

# (id, heading) of each section, in reading order; the ids are stable anchors.
SECTIONS = (
    ("overview", "At a glance"),
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
SWEEP_BOOKKEEPING = {"trial", "val_acc", "val_loss", "best_epoch", "epochs", "seconds"}
CV_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
CLUSTER_HEADLINE = ("hungarian_accuracy", "nmi", "ari", "silhouette")
CLUSTER_KEY = re.compile(r"^cluster_(?P<features>.+)_(?P<kind>metrics|montage|scatter)$")
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:1rem 2rem 4rem;background:#fff}
h1{margin-top:.5rem}h2{border-bottom:2px solid #4c72b0;padding-bottom:.2rem;margin-top:2.5rem}
nav ol{columns:2;background:#f0f3f8;padding:.8rem 2.5rem;border-radius:6px}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ccd;padding:.25rem .6rem;text-align:left;font-variant-numeric:tabular-nums}
th{background:#eef1f7}
.note{color:#666;font-style:italic}.tables{display:flex;flex-wrap:wrap;gap:2rem}
.figures{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
figure{margin:.5rem 0}figcaption{font-size:.85rem;color:#555}
img{max-width:100%;height:auto;border:1px solid #ddd}
pre{background:#f5f5f5;padding:.8rem;overflow-x:auto;font-size:.85rem}
.headline{display:flex;flex-wrap:wrap;gap:1rem}
.headline div{background:#f0f3f8;border-radius:6px;padding:.5rem 1rem}
.headline b{display:block;font-size:1.4rem}
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


# ----------------------------------------------------------------------------- inputs


def input_paths(results: str, sweep_enabled: bool, features: Sequence[str]) -> dict[str, str]:
    """The named files the report reads; sweep and per-feature cluster files only when configured."""
    paths = {
        "config": f"{results}/config.yaml",
        "clean_summary": f"{results}/clean/summary.json",
        "rejected": f"{results}/clean/rejected.csv",
        "rejected_examples": f"{results}/clean/rejected_examples.png",
        "augment_preview": f"{results}/augment/preview.png",
        "cv_summary": f"{results}/cv/summary.csv",
        "suspects": f"{results}/cv/suspect_labels.csv",
        "suspects_png": f"{results}/cv/suspect_labels.png",
        "test_metrics": f"{results}/evaluate/metrics.json",
        "confusion": f"{results}/evaluate/confusion.png",
        "per_class": f"{results}/evaluate/per_class.csv",
        "curves": f"{results}/evaluate/curves.png",
    }
    if sweep_enabled:
        paths["sweep_trials"] = f"{results}/sweep/trials.csv"
        paths["sweep_best"] = f"{results}/sweep/best.yaml"
        paths["sweep_plot"] = f"{results}/sweep/sweep.png"
    for name in features:
        for kind in ("metrics", "montage", "scatter"):
            paths[f"cluster_{name}_{kind}"] = f"{results}/cluster/{name}/{kind}.{_ext(kind)}"
    return paths


def _ext(kind: str) -> str:
    return "json" if kind == "metrics" else "png"


def _existing(inputs: Mapping[str, str], key: str) -> Path | None:
    path = inputs.get(key)
    return Path(path) if path and Path(path).is_file() else None


def read_json(inputs: Mapping[str, str], key: str) -> dict | None:
    """The JSON object of input ``key``, or None when it is absent."""
    path = _existing(inputs, key)
    if path is None:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {"value": data}


def read_csv(inputs: Mapping[str, str], key: str) -> pd.DataFrame | None:
    """The table of input ``key`` (all columns as read by pandas), or None when it is absent."""
    path = _existing(inputs, key)
    if path is None:
        return None
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def read_text(inputs: Mapping[str, str], key: str) -> str | None:
    """The text of input ``key``, or None when it is absent."""
    path = _existing(inputs, key)
    return None if path is None else path.read_text(encoding="utf-8")


def cluster_features(inputs: Mapping[str, str]) -> list[str]:
    """The feature spaces that have cluster inputs, in input order."""
    found = []
    for key in inputs:
        match = CLUSTER_KEY.match(key)
        if match and match["features"] not in found:
            found.append(match["features"])
    return found


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
    """The validation metric column of the sweep table (val_acc preferred over val_loss)."""
    return next((m for m in ("val_acc", "val_loss") if m in trials.columns), None)


def sorted_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials best first: highest accuracy or lowest loss (stable for ties)."""
    metric = sweep_metric(trials)
    if metric is None or trials.empty:
        return trials
    ascending = metric.endswith("loss")
    return trials.sort_values(metric, ascending=ascending, kind="stable").reset_index(drop=True)


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


def headline(inputs: Mapping[str, str], title: str = "") -> dict[str, Any]:
    """The headline numbers for machines (results/report/summary.json)."""
    return {
        "title": title,
        "images": _images_headline(inputs),
        "test": _test_headline(inputs),
        "cv": _cv_headline(inputs),
        "sweep": _sweep_headline(inputs),
        "clusters": _cluster_headline(inputs),
    }


def _images_headline(inputs: Mapping[str, str]) -> dict[str, Any] | None:
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


def _test_headline(inputs: Mapping[str, str]) -> dict[str, Any] | None:
    metrics = read_json(inputs, "test_metrics")
    if metrics is None:
        return None
    return {
        "accuracy": find_number(metrics, ["accuracy", "acc"]),
        "f1_macro": find_number(metrics, ["f1_macro", "macro_f1", "macro avg.f1-score"]),
        "n_test": find_number(metrics, ["n_test"]),
    }


def _cv_headline(inputs: Mapping[str, str]) -> dict[str, Any] | None:
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
    return result


def _sweep_headline(inputs: Mapping[str, str]) -> dict[str, Any] | None:
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


def _cluster_headline(inputs: Mapping[str, str]) -> dict[str, Any]:
    result = {}
    for name in cluster_features(inputs):
        metrics = read_json(inputs, f"cluster_{name}_metrics")
        if metrics is not None:
            result[name] = {key: find_number(metrics, [key]) for key in CLUSTER_HEADLINE}
    return result


# ----------------------------------------------------------------------------- html pieces


def esc(value: Any) -> str:
    """Text from the data, escaped for HTML (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def note(text: str) -> str:
    """A short italic remark (e.g. why a section is empty)."""
    return f'<p class="note">{esc(text)}</p>'


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


def mapping_table(data: Mapping, key_name: str = "key", value_name: str = "value") -> str:
    """A two-column table of a flat or nested mapping (nested keys dotted)."""
    rows = [(k, _cell(v)) for k, v in flatten(data).items()]
    return table(pd.DataFrame(rows, columns=[key_name, value_name]))


def _cell(value: Any) -> Any:
    if isinstance(value, list | tuple | Mapping):
        return json.dumps(value, ensure_ascii=False, default=str)
    return plain(value)


def image(inputs: Mapping[str, str], key: str, caption: str) -> str:
    """A <figure> with the input image embedded as a data URI, or a note when it is absent."""
    path = _existing(inputs, key)
    if path is None:
        return not_run(caption)
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def section(section_id: str, body: str) -> str:
    """One <section> with its anchor id and heading."""
    heading = dict(SECTIONS)[section_id]
    return f'<section id="{section_id}">\n<h2>{esc(heading)}</h2>\n{body}\n</section>'


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------- sections


def overview_section(numbers: Mapping[str, Any]) -> str:
    """Headline tiles: images kept/rejected, test accuracy and F1, cv accuracy, best trial."""
    tiles = []
    images, test, cv = numbers["images"] or {}, numbers["test"] or {}, numbers["cv"] or {}
    sweep = numbers["sweep"] or {}
    tiles.append(("images kept", _fmt(images.get("kept"))))
    tiles.append(("images rejected", _fmt(images.get("rejected"))))
    tiles.append(("test accuracy", _fmt(test.get("accuracy"))))
    tiles.append(("test macro F1", _fmt(test.get("f1_macro"))))
    if "accuracy_mean" in cv:
        tiles.append(
            (
                f"{cv['k']}-fold accuracy",
                f"{_fmt(cv['accuracy_mean'])} ± {_fmt(cv['accuracy_std'])}",
            )
        )
    if sweep:
        tiles.append((f"best trial ({sweep['metric']})", _fmt(sweep.get("best_value"))))
    for name, metrics in numbers["clusters"].items():
        tiles.append((f"{name} clusters: Hungarian acc.", _fmt(metrics.get("hungarian_accuracy"))))
    cells = "".join(f"<div>{esc(label)}<b>{esc(value)}</b></div>" for label, value in tiles)
    return section("overview", f'<div class="headline">{cells}</div>')


def cleaning_section(inputs: Mapping[str, str], examples_per_reason: int) -> str:
    """Counts per class and per reason, the rest of clean/summary.json, example rejects."""
    summary = read_json(inputs, "clean_summary")
    rejected = read_csv(inputs, "rejected")
    if summary is None and rejected is None:
        return section("cleaning", not_run("the clean stage"))
    parts = []
    summary = summary or {}
    tables = []
    for key, value in summary.items():
        if isinstance(value, Mapping):
            tables.append(f"<div><h3>{esc(key)}</h3>{mapping_table(value, 'key', 'count')}</div>")
    scalars = {k: v for k, v in summary.items() if not isinstance(v, Mapping)}
    if scalars:
        tables.append(f"<div><h3>other</h3>{mapping_table(scalars)}</div>")
    if tables:
        parts.append(f'<div class="tables">{"".join(tables)}</div>')
    parts.append(image(inputs, "rejected_examples", "examples of rejected images, per reason"))
    parts.append(rejected_examples_table(rejected, examples_per_reason))
    return section("cleaning", "\n".join(parts))


def rejected_examples_table(rejected: pd.DataFrame | None, per_reason: int) -> str:
    """The first ``per_reason`` rejected files of each reason, with the detail given."""
    if rejected is None:
        return not_run("rejected.csv")
    if rejected.empty or "reason" not in rejected.columns:
        return note("No image was rejected.")
    columns = [c for c in ("reason", "relpath", "label", "source", "detail") if c in rejected]
    shown = rejected.groupby("reason", sort=True, group_keys=False).head(per_reason)
    shown = shown.sort_values("reason", kind="stable")[columns]
    heading = f"<h3>Rejected files (up to {per_reason} per reason, of {len(rejected)})</h3>"
    return heading + table(shown)


def augmentation_section(inputs: Mapping[str, str]) -> str:
    """The augment stage's preview grid."""
    return section(
        "augmentation", image(inputs, "augment_preview", "originals and their augmented views")
    )


def sweep_section(inputs: Mapping[str, str], max_rows: int) -> str:
    """Trials sorted by the validation metric, the winner (best.yaml) and the sweep plot."""
    trials = read_csv(inputs, "sweep_trials")
    if trials is None:
        return section("sweep", not_run("the sweep (sweep.enabled is false or it has not run)"))
    metric = sweep_metric(trials)
    order = "highest first" if metric and not metric.endswith("loss") else "lowest first"
    parts = [f"<p>{len(trials)} trials, sorted by {esc(metric or 'file order')} ({order}).</p>"]
    parts.append(table(sorted_trials(trials), max_rows))
    best = read_text(inputs, "sweep_best")
    if best is not None:
        parts.append(f"<h3>Chosen (best.yaml)</h3><pre>{esc(best)}</pre>")
    parts.append(image(inputs, "sweep_plot", "validation metric per trial"))
    return section("sweep", "\n".join(parts))


def cv_section(inputs: Mapping[str, str]) -> str:
    """Per-fold metrics and mean ± std."""
    summary = read_csv(inputs, "cv_summary")
    if summary is None or "fold" not in summary.columns:
        return section("cv", not_run("k-fold cross-validation"))
    mean, std = cv_row(summary, "mean") or {}, cv_row(summary, "std") or {}
    folds = summary[~summary["fold"].astype(str).isin(["mean", "std"])]
    items = "".join(f"<li>{esc(m)}: <b>{_fmt(mean[m])} ± {_fmt(std.get(m))}</b></li>" for m in mean)
    body = f"<p>{len(folds)} folds (mean ± sample standard deviation):</p><ul>{items}</ul>"
    return section("cv", body + table(summary))


def test_section(inputs: Mapping[str, str]) -> str:
    """Test metrics, the confusion matrix and the per-class table."""
    metrics = read_json(inputs, "test_metrics")
    per_class = read_csv(inputs, "per_class")
    if metrics is None and per_class is None:
        return section("test", not_run("the test-set evaluation"))
    parts = []
    if metrics is not None:
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping | list)}
        parts.append(mapping_table(scalars, "metric", "value"))
    parts.append(image(inputs, "confusion", "confusion matrix on the test set"))
    parts.append("<h3>Per class</h3>")
    parts.append(table(per_class) if per_class is not None else not_run("per_class.csv"))
    return section("test", "\n".join(parts))


def training_section(inputs: Mapping[str, str]) -> str:
    """The final model's loss and accuracy curves."""
    return section("training", image(inputs, "curves", "training and validation curves"))


def suspects_section(inputs: Mapping[str, str], max_rows: int) -> str:
    """Images whose out-of-fold prediction disagrees with their label, as ranked by the cv stage."""
    suspects = read_csv(inputs, "suspects")
    if suspects is None:
        return section("suspects", not_run("the suspect-label search"))
    parts = [
        "<p>Images whose out-of-fold prediction contradicts the given label "
        "(most suspect first, as ranked by the cross-validation stage).</p>",
        table(suspects, max_rows) if not suspects.empty else note("No suspect label."),
        image(inputs, "suspects_png", "most suspect images"),
    ]
    return section("suspects", "\n".join(parts))


def clusters_section(inputs: Mapping[str, str]) -> str:
    """Cluster metrics per feature space side by side, then each space's montage and scatter."""
    features = cluster_features(inputs)
    if not features:
        return section("clusters", not_run("clustering"))
    columns = {}
    for name in features:
        metrics = read_json(inputs, f"cluster_{name}_metrics")
        if metrics is not None:
            flat = flatten(metrics)
            columns[name] = {
                k: _cell(v) for k, v in flat.items() if _is_number(v) or isinstance(v, str)
            }
    parts = []
    if columns:
        side_by_side = pd.DataFrame(columns)
        side_by_side.index.name = "metric"
        parts.append(table(side_by_side, index=True))
    else:
        parts.append(not_run("cluster metrics"))
    for name in features:
        parts.append(f"<h3>{esc(name)}</h3>")
        figures = image(inputs, f"cluster_{name}_montage", f"{name}: images per cluster")
        figures += image(inputs, f"cluster_{name}_scatter", f"{name}: 2-D projection")
        parts.append(f'<div class="figures">{figures}</div>')
    return section("clusters", "\n".join(parts))


def config_section(inputs: Mapping[str, str]) -> str:
    """The effective configuration of the run (results/config.yaml)."""
    text = read_text(inputs, "config")
    if text is None:
        return section("config", not_run("the configuration snapshot"))
    return section("config", f"<pre>{esc(text)}</pre>")


# ----------------------------------------------------------------------------- page


def render_page(
    inputs: Mapping[str, str],
    title: str = "imgpipe report",
    examples_per_reason: int = 8,
    max_rows: int = 25,
) -> str:
    """The whole self-contained HTML page for the named input files."""
    numbers = headline(inputs, title)
    body = [
        overview_section(numbers),
        cleaning_section(inputs, examples_per_reason),
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
    inputs: Mapping[str, str],
    html_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """Write index.html and summary.json from the inputs and the ``report`` config; return the numbers."""
    title = options.get("title", "imgpipe report")
    page = render_page(
        inputs,
        title=title,
        examples_per_reason=int(options.get("examples_per_reason", 8)),
        max_rows=int(options.get("max_rows", 25)),
    )
    numbers = headline(inputs, title)
    write_text(page, html_path)
    write_text(json.dumps(numbers, indent=2, ensure_ascii=False) + "\n", summary_path)
    return numbers


def write_config_snapshot(
    config: Mapping,
    path: str | os.PathLike,
    configfiles: Sequence[str] = (),
    image: Mapping[str, Any] | None = None,
) -> None:
    """Write the effective (validated, defaults filled in) configuration as YAML.

    ``image`` (results/ingest/image.json) replaces the image section's values
    by those ingest used; a value the config left at ``auto`` gets a comment
    saying it was inferred from the data, and from what.
    """
    config = plain(config)
    notes: dict[str, str] = {}
    if image is not None:
        section = dict(config.get("image") or {})
        reasons = image.get("reasons", {})
        for key in ("size", "mode"):
            if section.get(key) == "auto":
                notes[key] = f"auto: inferred from the data ({reasons.get(key, 'image.json')})"
            section[key] = image[key]
        section["fit"] = image.get("fit", section.get("fit"))
        config["image"] = section
    header = "# Effective configuration of this run (defaults filled in)"
    if configfiles:
        header += "\n# from: " + ", ".join(str(f) for f in configfiles)
    if notes:
        header += (
            f"\n# image.{' and image.'.join(notes)}: auto in the config, inferred from the "
            "data (results/ingest/image.json)"
        )
    body = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    write_text(header + "\n" + _annotate_image(body, notes), path)


def _annotate_image(text: str, notes: Mapping[str, str]) -> str:
    """Append ``# note`` to the image section's lines of a YAML dump."""
    lines, section = text.splitlines(), None
    for k, line in enumerate(lines):
        if line and not line.startswith(" "):
            section = line.split(":", 1)[0]
            continue
        key = line.strip().split(":", 1)[0]
        if section == "image" and key in notes:
            lines[k] = f"{line}  # {notes[key]}"
    return "\n".join(lines) + "\n"


def run_report(job: StageJob) -> dict[str, Any]:
    """The report stage: index.html and summary.json from every result file."""
    inputs = {name: str(path) for name, path in job.input.items()}
    numbers = write_report(inputs, job.output["html"], job.output["summary"], job.params["report"])
    log.info("wrote %s and %s", job.output["html"], job.output["summary"])
    log.info("headline numbers: %s", numbers)
    return numbers


def run_config_snapshot(job: StageJob) -> None:
    """The config_snapshot stage: the effective configuration as results/config.yaml."""
    image = None
    if job.input.get("image"):
        with open(job.input["image"], encoding="utf-8") as fh:
            image = json.load(fh)
    write_config_snapshot(
        job.params["config"], job.output["config"], job.params["configfiles"], image
    )
    log.info("wrote the effective configuration to %s", job.output["config"])
