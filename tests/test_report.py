"""The results page (imgpipe.report), its Snakemake rules, captions and a headless-browser check."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from imgpipe.report import ledger, model_sections, pieces, render_page, summary, write_report
from imgpipe.stages import config_snapshot

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SECTION_IDS = [sid for sid, _ in pieces.SECTIONS]
NASTY = "<script>alert('x')</script> & naïve ü.png"
FEATURES = ("pixels", "embeddings")
# The report section of the config as the schema's defaults fill it in.
OPTIONS = {"title": "imgpipe report", "examples_per_reason": 8, "max_rows": 25}
EXPORT_SIDECARS = {"export_onnx": "model.onnx.json", "export_int8": "model.int8.onnx.json"}


def existing_exports(results: str) -> list[str]:
    """The export sidecars present under ``results/export`` (the rule asks for those only)."""
    return [key for key, name in EXPORT_SIDECARS.items() if Path(results, "export", name).is_file()]


def report_inputs(
    results: str,
    sweep_enabled: bool,
    features: list[str],
    folds: int = 0,
    trials: list[str] = (),
    exports: list[str] = (),
) -> dict:
    """The named inputs the report rule passes for this layout (workflow/rules/common.smk,
    report_inputs; test_the_report_rule_asks_for_the_files_the_page_reads checks the real one)."""
    paths = {
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
        "final_summary": f"{results}/train/final/summary.json",
    }
    if folds:
        paths["fold_histories"] = [f"{results}/cv/fold-{k}/history.csv" for k in range(folds)]
        paths["fold_summaries"] = [f"{results}/cv/fold-{k}/summary.json" for k in range(folds)]
    if sweep_enabled:
        paths["sweep_trials"] = f"{results}/sweep/trials.csv"
        paths["sweep_best"] = f"{results}/sweep/best.yaml"
        paths["sweep_plot"] = f"{results}/sweep/sweep.png"
        if trials:
            paths["trial_histories"] = [f"{results}/sweep/trials/{t}/history.csv" for t in trials]
            paths["trial_summaries"] = [f"{results}/sweep/trials/{t}/summary.json" for t in trials]
    for name in features:
        for kind, ext in (("metrics", "json"), ("montage", "png"), ("scatter", "png")):
            paths[f"cluster_{name}_{kind}"] = f"{results}/cluster/{name}/{kind}.{ext}"
    for key in exports:
        paths[key] = f"{results}/export/{EXPORT_SIDECARS[key]}"
    return paths


# ----------------------------------------------------------------------------- fake results


def write_png(path: Path, seed: int, size: int = 48) -> None:
    """A small non-uniform PNG (noise plus a gradient) at ``path``."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image[:, : size // 2] = np.linspace(0, 255, size // 2, dtype=np.uint8)[None, :, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def write_fake_results(
    root: Path, sweep: bool = True, features: tuple[str, ...] = FEATURES, metric: str = "val_acc"
) -> dict[str, str]:
    """A results tree with the documented files and columns; return the report's input paths."""
    r = root / "results"
    (r / "clean").mkdir(parents=True)
    config = {
        "train": {"lr": 0.003, "max_epochs": 3},
        "augment": {
            "on_device": True,
            "copies": 0,
            "crop_area": [1.0, 1.0],
            "crop_ratio": [0.75, 1.333],
            "scale": [0.9, 1.1],
            "rotation": 10.0,
            "translate": 0.1,
            "hflip": True,
            "vflip": False,
            "brightness": 0.2,
            "contrast": 0.0,
        },
        "report": {"title": "fake <run>"},
    }
    (r / "config.yaml").write_text("# a snapshot\n" + yaml.safe_dump(config, sort_keys=False))
    summary = {
        "total": {"listed": 120, "kept": 100, "rejected": 20},
        "kept_per_class": {"cat": 60, "dog": 40},
        "kept_per_source": {"train": 80, "test": 20},
        "rejected_per_reason": {"too_dark": 12, "exact_duplicate": 7, "not_image": 1},
        "rejected_per_class": {"cat": 13, "dog": 7},
        "near_duplicates": {
            "mode": "group",
            "groups": 95,
            "groups_above_one": 4,
            "max_group_size": 3,
            "components_above_one": 3,
            "max_component_size": 4,
            "images_in_components_above_one": 9,
            "large_components": [
                {"group": 7, "size": 4, "examples": ["/data/cat/a.png", "/data/cat/b.png"]}
            ],
            "candidate_pairs": 30,
            "correlations_computed": 12,
        },
        "leakage": {"test_leak": 0},
        "settings": {"near_duplicates": "group", "dark": 20, "min_per_class": 2},
    }
    (r / "clean" / "summary.json").write_text(json.dumps(summary))
    pd.DataFrame(
        {
            "id": range(100),
            "label": ["cat"] * 60 + ["dog"] * 40,
            "sha256": [f"{i:064x}" for i in range(100)],
        }
    ).to_csv(r / "clean" / "index.csv", index=False)
    rejected = [
        (f"/data/cat/dark{i}.png", f"cat/dark{i}.png", "cat", "train", "too_dark", f"p99={i}")
        for i in range(12)
    ]
    rejected += [
        (f"/data/dog/d{i}.png", f"dog/d{i}.png", "dog", "train", "exact_duplicate", "of x")
        for i in range(6)
    ]
    rejected.append(
        (f"/data/dog/{NASTY}", f"dog/{NASTY}", "dog", "test", "exact_duplicate", "a < b & c")
    )
    rejected.append(("/data/cat/x.png", "cat/x.png", "cat", "train", "not_image", "bad header"))
    columns = ["path", "relpath", "label", "source", "reason", "detail"]
    pd.DataFrame(rejected, columns=columns).to_csv(r / "clean" / "rejected.csv", index=False)
    write_png(r / "clean" / "rejected_examples.png", 1)
    write_png(r / "augment" / "preview.png", 2)

    if sweep:
        trials = pd.DataFrame(
            {
                "trial": ["lr~0.001", "lr~0.003", "lr~0.01"],
                "train.lr": [0.001, 0.003, 0.01],
                metric: [0.91, 0.95, 0.93] if metric == "val_acc" else [0.4, 0.2, 0.3],
                "best_epoch": [7, 9, 4],
                "epochs": [10, 12, 8],
                "seconds": [30.5, 31.0, 29.9],
            }
        )
        (r / "sweep").mkdir()
        trials.to_csv(r / "sweep" / "trials.csv", index=False)
        (r / "sweep" / "best.yaml").write_text(
            "trial: lr~0.003\noverrides:\n  train.lr: 0.003\nmetric: val_acc\nscore: 0.95\nepochs: 2\n"
        )
        write_png(r / "sweep" / "sweep.png", 3)
        for k, trial in enumerate(trials["trial"]):
            write_history(r / "sweep" / "trials" / trial / "history.csv", 3, seed=k, validated=True)

    (r / "cv").mkdir()
    for k in range(3):
        write_history(r / "cv" / f"fold-{k}" / "history.csv", 2, seed=10 + k, validated=False)
    (r / "train" / "final").mkdir(parents=True)
    write_history(r / "train" / "final" / "history.csv", 2, seed=20, validated=not sweep)
    # write_history wrote the schedule's fields; the final model's summary adds how it ended.
    final_path = r / "train" / "final" / "summary.json"
    final_summary = {**json.loads(final_path.read_text()), "best_epoch": 1, "stopped_early": False}
    final_path.write_text(json.dumps(final_summary))
    folds = pd.DataFrame(
        {
            "fold": [0, 1, 2],
            "accuracy": [0.90, 0.92, 0.94],
            "balanced_accuracy": [0.89, 0.91, 0.93],
            "precision_macro": [0.89, 0.91, 0.95],
            "recall_macro": [0.88, 0.92, 0.93],
            "f1_macro": [0.885, 0.915, 0.94],
        }
    )
    metrics = folds.drop(columns="fold")
    table = pd.concat(
        [
            folds.astype({"fold": str}),
            metrics.mean().to_frame().T.assign(fold="mean"),
            metrics.std(ddof=1).to_frame().T.assign(fold="std"),
        ]
    )
    table.to_csv(r / "cv" / "summary.csv", index=False)
    pd.DataFrame(
        {
            "path": [f"/data/cat/{NASTY}", "/data/dog/7.png"],
            "given_label": ["cat", "dog"],
            "suggested_label": ["dog", "cat"],
            "score": [0.01, 0.05],
        }
    ).to_csv(r / "cv" / "suspect_labels.csv", index=False)
    write_png(r / "cv" / "suspect_labels.png", 4)

    (r / "evaluate").mkdir()
    test_metrics = {
        "accuracy": 0.9375,
        "balanced_accuracy": 0.93,
        "f1_macro": 0.931,
        "n_test": 32,
        "classes": ["cat", "dog", "bird"],
        "classes_tested": 2,
        "classes_without_test_images": ["bird"],
        "per_class": {"cat": {"accuracy": 0.5, "f1": 0.94}, "dog": {"accuracy": 0.1, "f1": 0.92}},
    }
    (r / "evaluate" / "metrics.json").write_text(json.dumps(test_metrics))
    pd.DataFrame(
        {
            "class": ["cat", "dog"],
            "precision": [0.95, 0.9],
            "recall": [0.93, 0.92],
            "support": [19, 13],
        }
    ).to_csv(r / "evaluate" / "per_class.csv", index=False)
    write_png(r / "evaluate" / "confusion.png", 5)

    for i, name in enumerate(features):
        folder = r / "cluster" / name
        folder.mkdir(parents=True)
        scores = {
            "hungarian_accuracy": 0.6 + 0.3 * i,
            "purity": 0.6 + 0.3 * i,
            "nmi": 0.5 + 0.3 * i,
            "ari": 0.4 + 0.3 * i,
            "silhouette": 0.1 + 0.1 * i,
            "n_samples": 32,
            "n_clusters": 2,
            "n_classes": 2,
        }
        metrics = {
            **scores,
            "inertia": 1234.5 / (i + 1),
            "scored_on": "test",
            "by_role": {"all": {**scores, "n_samples": 100}, "train": scores, "test": scores},
            "features": name,
            "method": "sklearn",
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))
        write_png(folder / "montage.png", 10 + i)
        write_png(folder / "scatter.png", 20 + i)
    trials = ["lr~0.001", "lr~0.003", "lr~0.01"] if sweep else []
    return report_inputs(str(r), sweep, list(features), folds=3, trials=trials)


def write_history(path: Path, epochs: int, seed: int, validated: bool) -> None:
    """A per-epoch training history as fit writes it (validation columns when ``validated``)."""
    rng = np.random.default_rng(seed)
    history = pd.DataFrame(
        {
            "epoch": range(epochs),
            "step": [5 * (e + 1) - 1 for e in range(epochs)],
            "train_loss": np.sort(rng.uniform(0.2, 2.0, epochs))[::-1],
        }
    )
    if validated:
        history["val_loss"] = np.sort(rng.uniform(0.3, 2.0, epochs))[::-1]
        history["val_acc"] = np.sort(rng.uniform(0.3, 0.95, epochs))
    history["lr"] = 0.01
    history["attempt"] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    history.to_csv(path, index=False)
    # The job's summary.json beside it: the schedule it ran (the training section's table).
    summary = {"train_images": 80, "batch_size": 16, "steps_per_epoch": 5, "epochs": epochs}
    (path.parent / "summary.json").write_text(json.dumps({**summary, "steps": 5 * epochs}))


# Generated charts on a full page: the class distribution and the training curves.
CHARTS = 2


# Elements a reader takes for headings or names (and the class of the tiles' names).
HEADING_TAGS = {"h1", "h2", "h3", "h4", "th", "figcaption", "caption", "summary", "title"}
SNAKE_CASE = re.compile(r"\b[a-z][a-z0-9]*_[a-z0-9_]+\b")


class PageParser(HTMLParser):
    """Collects section ids, <img> sources, every element id and the text of every heading."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.ids: dict[str, dict[str, str | None]] = {}
        self.external: list[str] = []
        self.headings: list[str] = []
        self._open: list[tuple[str, bool]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag not in {"img", "meta", "br", "hr", "link", "input"}:
            heading = tag in HEADING_TAGS or "label" in (attributes.get("class") or "").split()
            self._open.append((tag, heading))
            if heading:
                self.headings.append("")
        if tag == "section":
            self.sections.append(attributes.get("id") or "")
        if tag == "img":
            self.images.append(attributes)
        if attributes.get("id"):
            self.ids[attributes["id"]] = attributes
        for key in ("src", "href"):
            value = attributes.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            closed, _ = self._open.pop()
            if closed == tag:
                break

    def handle_data(self, data: str) -> None:
        if any(heading for _, heading in self._open):
            self.headings[-1] += data


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


def section_html(page: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


# ----------------------------------------------------------------------------- unit tests


KEYS_SNAKEFILE = """
import json
import sys
include: {snakefile!r}
# Every rule is defined here: the report rule's input function as Snakemake calls it, and
# whether building the DAG imported any page code.
page_code = sorted(name for name in sys.modules if name.startswith("imgpipe.report"))
Path({keys!r}).write_text(json.dumps({{"inputs": report_inputs(None), "page_code": page_code}}))
"""


def rule_inputs(tmp_path: Path, config: dict) -> dict:
    """The report rule's named inputs for ``config``, from the real workflow (a dry run)."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakefile, keys = tmp_path / "Snakefile", tmp_path / "keys.json"
    snakefile.write_text(KEYS_SNAKEFILE.format(snakefile=str(REPO / "Snakefile"), keys=str(keys)))
    config_file = str(tmp_path / "config.yaml")
    snakemake(tmp_path, "-n", "--snakefile", str(snakefile), "--configfile", config_file)
    found = json.loads(keys.read_text())
    assert found["page_code"] == []  # building the DAG imports no page code
    return found["inputs"]


def test_the_report_rule_asks_for_the_files_the_page_reads(tmp_path):
    from snakemake.utils import Paramspace

    from imgpipe.learn.sweep import trial_table

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["sweep"]["enabled"] = True
    config["cluster"]["features"] = ["pixels", "embeddings"]
    trials = Paramspace(trial_table(config["sweep"]), filename_params="*", single_wildcard="trial")
    expected = report_inputs(
        "results",
        True,
        ["pixels", "embeddings"],
        folds=config["cv"]["k"],
        trials=list(trials.instance_patterns),
    )
    # The page's keys (the contract between rule and page), in the same order.
    assert list(rule_inputs(tmp_path, config).items()) == list(expected.items())
    assert all(name.isidentifier() for name in expected)  # Snakemake's attribute names

    # No sweep, one feature space, and an export made: its sidecar joins the inputs.
    config["sweep"]["enabled"] = False
    config["cluster"]["features"] = ["pixels"]
    (tmp_path / "results" / "export").mkdir(parents=True)
    (tmp_path / "results" / "export" / "model.onnx.json").write_text("{}")
    expected = report_inputs(
        "results", False, ["pixels"], folds=config["cv"]["k"], exports=["export_onnx"]
    )
    assert rule_inputs(tmp_path, config) == expected


def with_baselines(inputs: dict, accuracy: float, balanced: float) -> None:
    """Give the fake run's metrics.json baselines (majority 0.374 / 0.167, linear 0.63 / 0.6)."""
    path = Path(inputs["test_metrics"])
    metrics = json.loads(path.read_text())
    metrics.update(accuracy=accuracy, balanced_accuracy=balanced)
    metrics["baselines"] = {
        "majority": {
            "class": "cat",
            "accuracy": 0.374,
            "balanced_accuracy": 0.167,
            "f1_macro": 0.09,
        },
        "linear_pixels": {
            "accuracy": 0.63,
            "balanced_accuracy": 0.6,
            "f1_macro": 0.58,
            "n_train": 400,
            "n_train_used": 400,
            "size": 16,
        },
    }
    path.write_text(json.dumps(metrics))


def test_a_collapsed_model_is_warned_about_on_the_page_and_in_runs_csv(tmp_path):
    inputs = write_fake_results(tmp_path)
    with_baselines(inputs, accuracy=0.374, balanced=0.167)  # always the majority class
    # The final model's own files: 10 optimizer steps, a validation loss 5x its minimum.
    history = pd.DataFrame(
        {"epoch": [0, 1], "step": [4, 9], "train_loss": [2.0, 2.0], "val_loss": [0.4, 2.0]}
    )
    history.to_csv(inputs["final_history"], index=False)
    out = tmp_path / "out"
    numbers = write_report(
        inputs, out / "index.html", out / "summary.json", OPTIONS, runs_path=tmp_path / "runs.csv"
    )
    page = (out / "index.html").read_text()
    warning = page.index('class="warning"')
    assert warning < page.index('class="headline"')  # at the top, before the tiles
    block = page[warning : page.index("</div>", warning)]
    assert "does not beat the baselines" in block
    assert "balanced accuracy 0.167 is not above the majority class&#x27;s 0.167" in block
    assert "only 10 optimizer steps" in block and "validation loss diverging" in block
    assert "still warming up" not in block  # the run did not stop early: not claimed
    assert '<a href="#training">training curves</a>' in block
    assert "0.374 — majority class 0.374, linear on pixels 0.63" in page.replace("<b>", "")
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert runs["baseline_majority_accuracy"].iloc[-1] == pytest.approx(0.374)
    assert runs["baseline_linear_accuracy"].iloc[-1] == pytest.approx(0.63)
    assert runs["baseline_linear_balanced_accuracy"].iloc[-1] == pytest.approx(0.6)
    assert "does not beat the baselines" in runs["warning"].iloc[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["warning"] == numbers["test"]["warning"]
    assert summary["test"]["baselines"]["baseline_majority_balanced_accuracy"] == 0.167


def test_a_model_above_its_baselines_gets_no_warning(tmp_path):
    inputs = write_fake_results(tmp_path)
    with_baselines(inputs, accuracy=0.9, balanced=0.88)
    out = tmp_path / "out"
    write_report(
        inputs, out / "index.html", out / "summary.json", OPTIONS, runs_path=tmp_path / "runs.csv"
    )
    page = (out / "index.html").read_text()
    assert 'class="warning"' not in page
    assert "linear on pixels 0.63" in page and "Linear on pixels" in page  # tile and test table
    assert pd.read_csv(tmp_path / "runs.csv")["warning"].isna().all()


def test_an_export_shows_its_float_and_int8_accuracy_in_the_test_section(tmp_path):
    inputs = write_fake_results(tmp_path)
    results = Path(inputs["test_metrics"]).parents[1]
    assert existing_exports(str(results)) == []  # no export yet: nothing is asked for
    export = results / "export"
    export.mkdir()
    float_test = {"role": "test", "images": 32, "accuracy": 0.8125}
    int8_test = {
        "role": "test",
        "images": 32,
        "accuracy_float": 0.8125,
        "accuracy_int8": 0.78125,
        "label_agreement": 0.96875,
        "max_abs_difference": 0.1,
    }
    (export / "model.onnx.json").write_text(json.dumps({"test": float_test}))
    (export / "model.int8.onnx.json").write_text(json.dumps({"quantization": {"test": int8_test}}))
    exports = existing_exports(str(results))
    assert exports == ["export_onnx", "export_int8"]
    inputs = {**inputs, **report_inputs(str(results), True, [], exports=exports)}
    assert inputs["export_int8"] == f"{results}/export/model.int8.onnx.json"
    out = tmp_path / "out"
    write_report(inputs, out / "index.html", out / "summary.json", OPTIONS, tmp_path / "r.csv")
    test = section_html((out / "index.html").read_text(), "test")
    assert "Exported models" in test
    for cells in (
        '<th scope="row">ONNX float (model.onnx)</th><td>0.8125</td>',
        '<th scope="row">ONNX int8 (model.int8.onnx)</th><td>0.7812</td><td>0.9688</td>',
    ):
        assert cells in test


def test_page_has_every_section_and_embeds_every_image(tmp_path):
    inputs = write_fake_results(tmp_path)
    out = tmp_path / "report"
    write_report(
        inputs,
        out / "index.html",
        out / "summary.json",
        {**OPTIONS, "title": "demo"},
        tmp_path / "runs.csv",
    )
    page = (out / "index.html").read_text()
    parsed = parse(page)

    assert parsed.sections == SECTION_IDS
    for section_id in SECTION_IDS:
        assert f'href="#{section_id}"' in page  # table of contents
    assert parsed.external == []  # nothing fetched from anywhere
    assert "<link" not in page

    pngs = [path for path in inputs.values() if isinstance(path, str) and path.endswith(".png")]
    assert len(parsed.images) == len(pngs) + CHARTS
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in parsed.images}
    assert embedded >= {Path(path).read_bytes() for path in pngs}
    assert all(len(data) > 1000 for data in embedded)  # charts drawn, not empty
    assert all(img["src"].startswith("data:image/png;base64,") for img in parsed.images)
    assert "Not run" not in page


def test_text_from_the_data_is_escaped(tmp_path):
    inputs = write_fake_results(tmp_path)
    page = render_page(inputs, title="<b>Tom & Jerry</b>")

    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(" in page
    assert "&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;" in page
    assert "naïve ü.png" in page  # non-ASCII survives as text
    assert "a &lt; b &amp; c" in page  # the detail column
    assert "title: fake &lt;run&gt;" in section_html(page, "config")
    # Only the page's own script remains.
    assert page.count("<script>") == 1


def test_missing_optional_inputs_render_as_not_run(tmp_path):
    inputs = write_fake_results(tmp_path, sweep=False, features=("pixels",))
    assert "trial_histories" not in inputs
    Path(inputs["suspects"]).unlink()
    Path(inputs["cluster_pixels_scatter"]).unlink()
    page = render_page(inputs)

    assert parse(page).sections == SECTION_IDS
    assert "Not run" in section_html(page, "sweep")
    assert "Not run" in section_html(page, "suspects")
    clusters = section_html(page, "clusters")
    assert "Pixels" in clusters and "Embeddings of the final model" not in clusters
    assert "Not run" in clusters and "<img" in clusters  # montage shown, scatter noted
    numbers = summary.headline(inputs)
    assert numbers["sweep"] is None
    assert set(numbers["clusters"]) == {"pixels"}


def test_nothing_at_all_still_gives_every_section(tmp_path):
    inputs = report_inputs(str(tmp_path / "results"), True, list(FEATURES))
    page = render_page(inputs)
    assert parse(page).sections == SECTION_IDS
    for section_id in SECTION_IDS[1:]:
        assert "Not run" in section_html(page, section_id), section_id


def test_summary_json_matches_the_inputs(tmp_path):
    inputs = write_fake_results(tmp_path)
    out = tmp_path / "out"
    write_report(inputs, out / "index.html", out / "summary.json", {**OPTIONS, "title": "t"})
    numbers = json.loads((out / "summary.json").read_text())

    clean = json.loads(Path(inputs["clean_summary"]).read_text())
    rejected = pd.read_csv(inputs["rejected"])
    assert numbers["images"]["kept"] == sum(clean["kept_per_class"].values())
    assert numbers["images"]["rejected"] == len(rejected)
    assert numbers["images"]["rejected_per_reason"] == rejected["reason"].value_counts().to_dict()

    metrics = json.loads(Path(inputs["test_metrics"]).read_text())
    assert numbers["test"] == {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "f1_macro": metrics["f1_macro"],
        "n_test": metrics["n_test"],
    }

    cv = pd.read_csv(inputs["cv_summary"])
    folds = cv[~cv["fold"].isin(["mean", "std"])]
    assert numbers["cv"]["k"] == len(folds)
    assert numbers["cv"]["accuracy_mean"] == pytest.approx(folds["accuracy"].astype(float).mean())
    assert numbers["cv"]["accuracy_std"] == pytest.approx(folds["accuracy"].astype(float).std())

    trials = pd.read_csv(inputs["sweep_trials"])
    best = trials.loc[trials["val_acc"].idxmax()]
    assert numbers["sweep"]["best_trial"] == best["trial"]
    assert numbers["sweep"]["best_value"] == best["val_acc"]
    assert numbers["sweep"]["best_params"] == {"train.lr": best["train.lr"]}
    assert numbers["sweep"]["n_trials"] == len(trials)

    for name in FEATURES:
        expected = json.loads(Path(inputs[f"cluster_{name}_metrics"]).read_text())
        assert numbers["clusters"][name]["hungarian_accuracy"] == expected["hungarian_accuracy"]
        assert numbers["clusters"][name]["nmi"] == expected["nmi"]
    # Both files were written atomically: no temp file is left beside them.
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "summary.json"]


@pytest.mark.parametrize("metric", ["val_acc", "val_loss"])
def test_sweep_table_is_sorted_best_first(tmp_path, metric):
    inputs = write_fake_results(tmp_path, metric=metric)
    sweep = section_html(render_page(inputs), "sweep")
    order = [
        m.start()
        for m in (re.search(re.escape(f"lr~{v}<"), sweep) for v in ("0.001", "0.003", "0.01"))
    ]
    # val_acc 0.91, 0.95, 0.93 -> 0.003, 0.01, 0.001; val_loss 0.4, 0.2, 0.3 -> 0.003, 0.01, 0.001
    assert order[1] < order[2] < order[0]
    assert summary.headline(inputs)["sweep"]["best_trial"] == "lr~0.003"


def test_a_file_name_that_is_not_utf8_is_shown_with_its_bytes_escaped(tmp_path):
    from imgpipe.core.atomic import read_csv, write_csv

    inputs = write_fake_results(tmp_path)
    rejected = read_csv(inputs["rejected"], keep_default_na=False)
    latin1 = os.fsdecode(b"cat/caf\xe9.png")  # as the listing gives a Latin-1 name
    rejected.loc[len(rejected)] = [f"/data/{latin1}", latin1, "cat", "train", "not_image", "x"]
    write_csv(rejected, inputs["rejected"])  # the name's own byte, as the pipeline writes it
    out = tmp_path / "out"
    write_report(inputs, out / "index.html", out / "summary.json", {**OPTIONS, "title": "t"})
    page = (out / "index.html").read_text(encoding="utf-8")  # valid UTF-8
    assert "cat/caf\\xe9.png" in page


def test_rejected_files_are_capped_per_reason(tmp_path):
    inputs = write_fake_results(tmp_path)
    cleaning = section_html(render_page(inputs, examples_per_reason=3), "cleaning")
    cleaning = cleaning.split("<h3>Rejected files", 1)[1]
    assert "(up to 3 per reason, of 20)" in cleaning
    assert cleaning.count("<td>Too dark</td>") == 3  # of 12
    assert cleaning.count("<td>Exact duplicate</td>") == 3  # of 7
    assert cleaning.count("<td>Not an image</td>") == 1


def test_long_tables_are_cut_to_max_rows(tmp_path):
    inputs = write_fake_results(tmp_path)
    suspects = pd.DataFrame(
        {
            "path": [f"/d/{i}.png" for i in range(40)],
            "given_label": "cat",
            "suggested_label": "dog",
            "score": np.linspace(0, 1, 40),
        }
    )
    suspects.to_csv(inputs["suspects"], index=False)
    section = section_html(render_page(inputs, max_rows=10), "suspects")
    assert "/d/9.png" in section and "/d/10.png" not in section
    assert "First 10 of 40 rows" in section


def test_cv_numbers_are_the_mean_and_std_rows_the_cv_stage_wrote(tmp_path):
    inputs = write_fake_results(tmp_path)
    table = pd.read_csv(inputs["cv_summary"])
    # The rows as written win over a recomputation from the folds (none is made).
    table.loc[table["fold"] == "mean", "accuracy"] = 0.5
    table.to_csv(inputs["cv_summary"], index=False)
    cv = summary.headline(inputs)["cv"]
    assert cv["accuracy_mean"] == 0.5 and cv["accuracy_std"] == pytest.approx(0.02)
    assert "0.5 ± 0.02" in section_html(render_page(inputs), "cv")
    # Without them, no mean is claimed.
    table[~table["fold"].isin(["mean", "std"])].to_csv(inputs["cv_summary"], index=False)
    assert summary.headline(inputs)["cv"] == {"k": 3}
    assert "<ul></ul>" in section_html(render_page(inputs), "cv")  # no score listed


def test_clusters_are_side_by_side(tmp_path):
    inputs = write_fake_results(tmp_path)
    clusters = section_html(render_page(inputs), "clusters")
    header = re.search(r"<thead>(.*?)</thead>", clusters, re.S).group(1)
    assert header.index("Pixels") < header.index("Embeddings")
    assert "Hungarian accuracy" in clusters and "Inertia" in clusters
    # The headline is on test images, and the page says so; each role has its row.
    assert "<td>Test images</td><td>Test images</td>" in clusters
    assert "never trained on" in clusters
    for role in ("Test images", "Training images", "All images"):
        assert f'<th scope="row">{role}</th>' in clusters


def test_find_number_prefers_exact_keys():
    data = {"per_class": {"a": {"accuracy": 0.1}}, "accuracy": 0.9, "total": {"kept": 5}}
    assert summary.find_number(data, ["accuracy"]) == 0.9
    assert summary.find_number(data, ["kept"]) == 5
    assert summary.find_number({"per_class": {"a": {"accuracy": 0.1}}}, ["accuracy"]) == 0.1
    assert summary.find_number({"x": "text"}, ["x"]) is None


def full_page(tmp_path: Path, **kwargs) -> tuple[dict, str]:
    """The inputs of a fake run and its page as the report stage writes it (with the run log)."""
    inputs = write_fake_results(tmp_path, **kwargs)
    out = tmp_path / "report"
    write_report(inputs, out / "index.html", out / "summary.json", OPTIONS, tmp_path / "runs.csv")
    return inputs, (out / "index.html").read_text()


def test_headings_and_row_names_are_words_not_keys(tmp_path):
    _, page = full_page(tmp_path)
    headings = [" ".join(text.split()) for text in parse(page).headings]
    assert "Best sweep trial" in headings and "Hungarian accuracy" in headings
    raw = [text for text in headings if SNAKE_CASE.search(text)]
    assert raw == [], f"raw keys shown as headings: {raw}"
    for key in ("kept_per_class", "hungarian_accuracy", "n_samples", "rejected_per_reason"):
        assert key not in page.split('<section id="config">')[0]
    # The clean settings' values are headed as values, not counts.
    cleaning = section_html(page, "cleaning")
    assert "<th>Setting</th><th>Value</th>" in cleaning
    # Every table and figure is explained in a sentence.
    for section_id in SECTION_IDS:
        body = section_html(page, section_id)
        if "<table" in body or "<img" in body:
            assert 'class="explain"' in body, section_id


def test_best_trial_tile_names_the_trial_with_its_score(tmp_path):
    _, page = full_page(tmp_path)
    tile = re.search(r'<span class="label">Best sweep trial</span>(.*?)</div>', page).group(1)
    assert "<b>lr~0.003</b>" in tile and "validation accuracy 0.95" in tile
    # Issue 20: the tile says what the number saw (the best of 3 on the same images).
    assert "best of 3 trials on the same validation images (optimistic)" in tile
    sweep = section_html(page, "sweep")
    assert "<th>Learning rate</th>" in sweep and "<b>lr~0.003</b> (learning rate 0.003)" in sweep
    assert "score is its <b>last</b> epoch" in sweep and "lower last-epoch validation" in sweep
    # With a sweep, the CV caption says the recipe was chosen on images inside its pool.
    assert "chosen by the sweep on the validation images" in section_html(page, "cv")
    _, page = full_page(tmp_path / "no-sweep", sweep=False)
    assert "chosen by the sweep" not in section_html(page, "cv")


def test_training_curves_show_the_winning_trial_and_the_folds(tmp_path):
    inputs, page = full_page(tmp_path)
    names = [name for name, _ in model_sections.training_histories(inputs)]
    assert names == ["best trial lr~0.003", "fold 0", "fold 1", "fold 2", "final model"]
    training = section_html(page, "training")
    assert training.count("<img") == 1
    assert "With validation: best trial lr~0.003." in training
    assert "Without validation: fold 0, fold 1, fold 2, final model" in training
    assert "make tensorboard" in training
    # Issue 20: each job's schedule as run, from its summary.json.
    assert "<th>Steps per epoch</th>" in training and "<th>Batch size</th>" in training
    assert "<td>final model</td>" in training and "<td>lr~0.01</td>" in training
    # Without a sweep the final model validates: its curve has validation values.
    inputs = write_fake_results(tmp_path / "no-sweep", sweep=False)
    histories = dict(model_sections.training_histories(inputs))
    assert list(histories) == ["fold 0", "fold 1", "fold 2", "final model"]
    assert histories["final model"]["val_acc"].notna().all()


def test_class_distribution_policy_and_untested_classes_are_shown(tmp_path):
    _, page = full_page(tmp_path)
    cleaning = section_html(page, "cleaning")
    assert "Images per class: kept (blue) and rejected (orange)." in cleaning
    assert "<th>Class</th>" in cleaning and "<td>13</td>" in cleaning  # cat's rejected count
    assert '<th scope="row">Linked sets of 2+ images' in cleaning
    assert "/data/cat/a.png, /data/cat/b.png" in cleaning  # the large linked set
    augmentation = section_html(page, "augmentation")
    for row, value in [
        ("Rotation", "± 10°"),
        ("Zoom", "0.9× to 1.1×"),
        ("Shift", "up to 10% of the side"),
        ("Mirror left-right", "half of the images"),
        ("Mirror upside down", "off"),
        ("Contrast", "off"),
        ("Random crop: share of the image area", "off"),
    ]:
        assert f'<th scope="row">{row}</th><td>{esc(value)}</td>' in augmentation, row
    test = section_html(page, "test")
    assert '<th scope="row">Balanced accuracy</th><td>0.93</td>' in test
    assert "Classes without test images</b> (1), not in the macro scores: bird." in test


def esc(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_runs_log_gains_one_row_per_run(tmp_path):
    inputs = write_fake_results(tmp_path)
    out, runs_path = tmp_path / "report", tmp_path / "results" / "runs.csv"

    def report_job():
        write_report(inputs, out / "index.html", out / "summary.json", OPTIONS, runs_path)
        return pd.read_csv(runs_path, dtype=str)

    runs = report_job()
    assert len(runs) == 1
    first = runs.iloc[0]
    assert first["changes"] == "first run"
    assert float(first["test_accuracy"]) == 0.9375
    assert float(first["cv_accuracy_mean"]) == pytest.approx(0.92)
    assert first["best_trial"] == "lr~0.003" and float(first["best_trial_score"]) == 0.95
    assert first["code_version"].startswith(ledger.code_version(tmp_path))
    assert len(first["config_hash"]) == 12 and len(first["data_fingerprint"]) == 12
    # A retried (or forced) report job over the same results adds nothing.
    assert len(report_job()) == 1

    # A config tweak reruns the report: a second row says what changed.
    config = Path(inputs["config"])
    config.write_text(config.read_text().replace("lr: 0.003", "lr: 0.01"))
    runs = report_job()
    assert len(runs) == 2
    assert runs["changes"].iloc[1] == "train.lr 0.003 → 0.01"
    assert runs["config_hash"].iloc[1] != runs["config_hash"].iloc[0]
    assert runs["data_fingerprint"].iloc[1] == runs["data_fingerprint"].iloc[0]
    assert len(report_job()) == 2

    # New data: a new fingerprint (the labels count too).
    index = pd.read_csv(inputs["clean_index"])
    index.loc[0, "label"] = "dog"
    index.to_csv(inputs["clean_index"], index=False)
    runs = report_job()
    assert len(runs) == 3
    assert runs["changes"].iloc[2] == "no config change"
    assert runs["data_fingerprint"].iloc[2] != runs["data_fingerprint"].iloc[1]

    # The page lists the runs newest first, this one highlighted.
    page_runs = section_html((out / "index.html").read_text(), "runs")
    assert page_runs.count("<tr") == 4  # header + 3 runs
    assert page_runs.index('<tr class="current">') < page_runs.index("train.lr 0.003 → 0.01")
    assert "first run" in page_runs


def test_code_version_names_the_commit_of_a_git_checkout(tmp_path):
    from imgpipe import __version__

    assert ledger.code_version(tmp_path) == __version__  # not a checkout: the version alone
    if (REPO / ".git").exists():
        assert re.fullmatch(
            re.escape(__version__) + r" [0-9a-f]{7,}(\+dirty)?", ledger.code_version(REPO)
        )


def test_config_changes_read_as_before_and_after():
    before = {"train.lr": 0.01, "cv.k": 5, "report.title": "a"}
    after = {"train.lr": 0.02, "cv.k": 5, "model.dropout": 0.3}
    assert ledger.config_changes(before, after) == (
        "model.dropout (unset) → 0.3; report.title a → (unset); train.lr 0.01 → 0.02"
    )
    assert ledger.config_changes(before, before) == "no config change"
    many = {f"k{i}": i for i in range(9)}
    assert ledger.config_changes({}, many, most=3).endswith("; and 6 more")


def test_ledger_row_is_a_function_of_the_inputs_and_the_numbers(tmp_path):
    results = tmp_path / "results"
    (results / "clean").mkdir(parents=True)
    (results / "config.yaml").write_text("# comment\ntrain: {lr: 0.01, max_epochs: 3}\n")
    pd.DataFrame({"sha256": ["b", "a"], "label": ["dog", "cat"]}).to_csv(
        results / "clean" / "index.csv", index=False
    )
    inputs = {
        "config": str(results / "config.yaml"),
        "clean_index": str(results / "clean/index.csv"),
    }
    numbers = {
        "images": {"kept": 2},
        "test": {"accuracy": 0.75, "baselines": {"baseline_majority_accuracy": 0.5}},
        "cv": {"accuracy_mean": 0.7, "accuracy_std": 0.1},
        "sweep": None,
    }
    previous = {"config": json.dumps({"train.lr": 0.003, "train.max_epochs": 3})}
    row = ledger.run_row(inputs, numbers, previous, this_run="abc")
    assert list(row) == list(ledger.RUN_COLUMNS)
    assert row["run_id"] == "abc" and row["images"] == 2 and row["test_accuracy"] == 0.75
    assert row["baseline_majority_accuracy"] == 0.5 and row["baseline_linear_accuracy"] is None
    assert row["changes"] == "train.lr 0.003 → 0.01"
    assert row["warning"] == "" and row["best_trial"] is None
    # Same content, other key order and comments: the same config hash; rows in any order: the
    # same data fingerprint.
    hashed = ledger.config_hash(inputs)
    (results / "config.yaml").write_text("train:\n  max_epochs: 3\n  lr: 0.01\n")
    assert ledger.config_hash(inputs) == hashed == row["config_hash"]
    pd.DataFrame({"sha256": ["a", "b"], "label": ["cat", "dog"]}).to_csv(
        results / "clean" / "index.csv", index=False
    )
    assert ledger.data_fingerprint(inputs) == row["data_fingerprint"]
    assert ledger.run_row(inputs, numbers, None)["changes"] == "first run"
    assert ledger.read_runs(tmp_path / "none.csv").columns.tolist() == list(ledger.RUN_COLUMNS)


def test_headline_is_a_function_of_the_result_files(tmp_path):
    (tmp_path / "rejected.csv").write_text(
        "relpath,reason\na.png,too_dark\nb.png,too_dark\nc,blurry\n"
    )
    (tmp_path / "clean.json").write_text(json.dumps({"kept_per_class": {"a": 3, "b": 4}}))
    (tmp_path / "trials.csv").write_text("trial,lr,val_acc\nlr~0.1,0.1,0.8\nlr~0.3,0.3,0.9\n")
    (tmp_path / "metrics.json").write_text(
        json.dumps({"nmi": 0.5, "by_role": {"test": {"nmi": 0.1}}})
    )
    inputs = {
        "clean_summary": str(tmp_path / "clean.json"),
        "rejected": str(tmp_path / "rejected.csv"),
        "sweep_trials": str(tmp_path / "trials.csv"),
        "cluster_pixels_metrics": str(tmp_path / "metrics.json"),
        "test_metrics": str(tmp_path / "absent.json"),
    }
    numbers = summary.headline(inputs, "t")
    assert numbers["images"] == {
        "kept": 7,  # summed over the classes when no total is given
        "rejected": 3,
        "kept_per_class": {"a": 3, "b": 4},
        "rejected_per_reason": {"blurry": 1, "too_dark": 2},
    }
    assert numbers["test"] is None and numbers["cv"] is None
    assert numbers["sweep"] == {
        "n_trials": 2,
        "metric": "val_acc",
        "best_trial": "lr~0.3",
        "best_value": 0.9,
        "best_params": {"lr": 0.3},
    }
    assert numbers["clusters"]["pixels"]["nmi"] == 0.5  # the top-level score, not a role's
    assert summary.headline(inputs, "t") == numbers  # reading changes nothing


def test_templates_render_with_autoescape():

    assert pieces.ENV.autoescape is True
    assert str(pieces.note("a <b> & 'c'")) == '<p class="note">a &lt;b&gt; &amp; &#x27;c&#x27;</p>'
    name = "<script>alert(1)</script>"
    row = str(pieces.row_table([(name, [name])], [name]))
    assert "<script>" not in row and row.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 3
    page = str(pieces.render("page.html.j2", title=name, toc=pieces.SECTIONS, sections=[]))
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt;</title>" in page
    assert page.count("<script>") == 1  # the page's own image check only


def test_the_class_names_of_the_data_are_escaped_on_the_page(tmp_path):
    from imgpipe.report.sections import cleaning_section

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"kept_per_class": {"<script>x</script>": 3}, "total": {}}))
    cleaning = str(cleaning_section({"clean_summary": str(path)}, 8, 25))
    assert "<script>" not in cleaning and "&lt;script&gt;x&lt;/script&gt;" in cleaning


def test_the_report_rule_reruns_when_its_package_or_a_template_changes(tmp_path, monkeypatch):
    from imgpipe.workflow import fingerprint

    closure = fingerprint.import_closure(REPO / "scripts" / "report.py")
    assert {"report", "report.ledger", "report.page", "stages.report"} <= set(closure)
    templates = {
        p.relative_to(REPO / "imgpipe").as_posix()
        for p in fingerprint.package_data(REPO / "imgpipe" / "report")
    }
    assert "report/templates/page.html.j2" in templates
    # A copy of the package whose template changes: the report's fingerprint changes.
    package = tmp_path / "imgpipe"
    shutil.copytree(REPO / "imgpipe", package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", package)
    script = REPO / "scripts" / "report.py"
    before = fingerprint.code_fingerprint(script)
    page = package / "report" / "templates" / "page.html.j2"
    page.write_text(page.read_text() + "\n")
    assert fingerprint.code_fingerprint(script) != before
    # ... and the config snapshot's does not move (it imports no page code).
    snapshot = REPO / "scripts" / "config_snapshot.py"
    assert "report" not in fingerprint.import_closure(snapshot)


def test_config_snapshot_round_trips(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    path = tmp_path / "config.yaml"
    config_snapshot.write_config_snapshot(config, path, ["config/config.yaml"])
    text = path.read_text()
    assert "# from: config/config.yaml" in text
    assert yaml.safe_load(text) == config
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ----------------------------------------------------------------------------- captions


def caption_references() -> set[str]:
    """Every caption file the rule files point at (caption="../report/<name>.rst")."""
    found = set()
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        found |= set(re.findall(r'caption="\.\./report/([^"]+)"', rules.read_text()))
    return found


EXPECTED_CAPTIONS = {
    "workflow.rst",
    "results_page.rst",
    "clean_summary.rst",
    "rejected_examples.rst",
    "augment_preview.rst",
    "training_curves.rst",
    "confusion.rst",
    "per_class.rst",
    "test_metrics.rst",
    "cluster_montage.rst",
    "cluster_scatter.rst",
    "cluster_metrics.rst",
    "sweep.rst",
    "cv_summary.rst",
    "suspect_labels.rst",
}


def render_caption(path: Path, config: dict) -> str:
    """Render a caption as `snakemake --report` does (Jinja2, then docutils to HTML)."""
    from docutils.core import publish_parts
    from jinja2 import Environment, StrictUndefined

    class FakeSnakemake:
        pass

    snakemake = FakeSnakemake()
    snakemake.config = config
    env = Environment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    text = env.from_string(path.read_text()).render(snakemake=snakemake, categories={}, files={})
    overrides = {"report_level": 2, "halt_level": 5}
    return publish_parts(text, writer="html", settings_overrides=overrides)["html_body"]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"sweep": {"enabled": False}, "clean": {"near_duplicates": "off"}},
        {"sweep": {"method": "random"}, "augment": {"hflip": True}, "cluster": {"tsne": True}},
    ],
)
def test_captions_render_without_errors(changes):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for section, values in changes.items():
        config[section].update(values)
    folder = REPO / "workflow" / "report"
    assert caption_references() <= {p.name for p in folder.glob("*.rst")}
    assert EXPECTED_CAPTIONS <= {p.name for p in folder.glob("*.rst")}
    for path in sorted(folder.glob("*.rst")):
        body = render_caption(path, config)
        assert "system-message" not in body, f"{path.name}: {body}"
        assert "{{" not in body and "{%" not in body
    workflow = render_caption(folder / "workflow.rst", config)
    assert workflow.count("<li>") == 7  # one item per stage, none glued together
    assert ("not run" in workflow) == (not config["sweep"]["enabled"])


# ----------------------------------------------------------------------------- Snakemake


def report_categories(report_html: str | Path) -> set[str]:
    """The result categories of a `snakemake --report` HTML file."""
    text = Path(report_html).read_text(encoding="utf-8")
    match = re.search(r'<script id="categories">\s*var categories = (.*?);\s*</script>', text, re.S)
    if match is None:
        raise ValueError(f"{report_html}: no categories block (not a Snakemake report?)")
    return set(json.loads(match.group(1)))


def snakemake(workdir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [SNAKEMAKE, "--cores", "1", "--directory", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TEST_SNAKEFILE = """
import sys
from pathlib import Path
import pandas as pd
from snakemake.utils import Paramspace
sys.path.insert(0, {repo!r})
from imgpipe.workflow.fingerprint import code_fingerprint

configfile: "config.yaml"

# The fake results' trials, named as workflow/rules/sweep.smk names them.
TRIALS = Paramspace(
    pd.DataFrame({{"lr": [0.001, 0.003, 0.01]}}), filename_params="*", single_wildcard="trial"
)

def code(script):
    return code_fingerprint(Path({repo!r}) / "scripts" / f"{{script}}.py")

# What workflow/rules/common.smk gives the report rules.
IMAGE_SETTINGS = "results/ingest/image.json"

def report_inputs(wildcards):
    return {inputs!r}

def configured():
    return {{key: value for key, value in config.items() if key != "progress"}}

include: {rules!r}
"""


@pytest.mark.slow
def test_report_rules_run_rerun_only_on_their_inputs_and_show_in_snakemake_report(tmp_path):
    write_fake_results(tmp_path)
    (tmp_path / "results" / "config.yaml").unlink()  # the rule writes it
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cv"]["k"] = 3  # the fake results' folds
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # image.size / mode as the image_settings rule resolved them (auto in the config).
    resolved = {"size": 16, "mode": "gray", "fit": "pad", "reasons": {}}
    (tmp_path / "results" / "ingest").mkdir(parents=True)
    (tmp_path / "results" / "ingest" / "image.json").write_text(json.dumps(resolved))
    snakefile = tmp_path / "Snakefile"
    rules = str(REPO / "workflow" / "rules" / "report.smk")
    inputs = report_inputs(
        "results", True, list(FEATURES), folds=3, trials=["lr~0.001", "lr~0.003", "lr~0.01"]
    )
    snakefile.write_text(TEST_SNAKEFILE.format(repo=str(REPO), rules=rules, inputs=inputs))
    base = ("--snakefile", str(snakefile))

    snakemake(tmp_path, *base, "results/report/index.html")
    page = (tmp_path / "results" / "report" / "index.html").read_text()
    assert parse(page).sections == SECTION_IDS
    assert "Not run" not in page
    snapshot = yaml.safe_load((tmp_path / "results" / "config.yaml").read_text())
    # The progress switch decides no result: the snapshot (and a run's identity) leaves it out;
    # image.size / mode hold the values resolved for the data.
    expected = {k: v for k, v in config.items() if k != "progress"}
    assert snapshot == {**expected, "image": {"size": 16, "mode": "gray", "fit": "pad"}}
    assert (tmp_path / "logs" / "report.log").read_text().count("headline numbers") == 1
    runs = tmp_path / "results" / "runs.csv"
    assert len(pd.read_csv(runs)) == 1
    assert "Not run" not in section_html(page, "runs")

    # A new title reruns the snapshot and the page, and they pick the title up.
    config["report"]["title"] = "second <run>"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(tmp_path, *base, "-n", "results/report/index.html")
    assert re.search(r"config_snapshot\s+1", dry.stdout) and re.search(r"report\s+1", dry.stdout)
    snakemake(tmp_path, *base, "results/report/index.html")
    assert "<h1>second &lt;run&gt;</h1>" in (tmp_path / "results/report/index.html").read_text()
    assert pd.read_csv(runs)["changes"].tolist() == [
        "first run",
        "report.title imgpipe report → second <run>",
    ]
    # Nothing to do: no job, no row.
    snakemake(tmp_path, *base, "results/report/index.html")
    assert len(pd.read_csv(runs)) == 2
    # Switching progress off reruns nothing.
    config["progress"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(tmp_path, *base, "-n", "results/report/index.html")
    assert "Nothing to be done" in dry.stdout + dry.stderr

    snakemake(tmp_path, *base, "--report", "report.html", "results/report/index.html")
    assert report_categories(tmp_path / "report.html") == {"Summary"}


# ----------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def chromium_binary():
    from helpers.chromium import ensure_chromium

    binary, reason = ensure_chromium()
    if binary is None:
        pytest.skip(f"headless Chromium unavailable: {reason}")
    return binary


def image_check(dom: str) -> tuple[int, int]:
    """(images shown, images broken) as the page's script recorded them in #imgcheck."""
    box = parse(dom).ids.get("imgcheck")
    assert box is not None and box.get("data-ok") is not None, "the page's image check did not run"
    return int(box["data-ok"]), int(box["data-broken"])


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path, chromium_binary):
    from helpers.chromium import dump_dom, screenshot

    inputs = write_fake_results(tmp_path)
    out = tmp_path / "report"
    runs = tmp_path / "results" / "runs.csv"
    write_report(
        inputs, out / "index.html", out / "summary.json", {**OPTIONS, "title": "browser"}, runs
    )

    dom = dump_dom(chromium_binary, out / "index.html")
    parsed = parse(dom)
    assert parsed.sections == SECTION_IDS
    shown, broken = image_check(dom)
    assert (shown, broken) == (len(parsed.images), 0)
    assert shown == CHARTS + sum(
        isinstance(path, str) and path.endswith(".png") for path in inputs.values()
    )
    assert all(img.get("data-ok") == "1" for img in parsed.images)

    # As a new user reads it: no raw snake_case key as a heading, a row name or a tile's name.
    headings = [" ".join(text.split()) for text in parsed.headings]
    assert len(headings) > 50
    raw = [text for text in headings if SNAKE_CASE.search(text)]
    assert raw == [], f"raw keys shown as headings: {raw}"
    assert all(img.get("src", "").startswith("data:image/png;base64,") for img in parsed.images)

    png = screenshot(chromium_binary, out / "index.html", tmp_path / "shot.png")
    pixels = cv2.imread(str(png))
    assert pixels.shape[:2] == (4000, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text and figures, not blank

    # The check can fail: a corrupt image is reported as broken.
    Path(inputs["augment_preview"]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_report(inputs, out / "index.html", out / "summary.json", OPTIONS)
    assert image_check(dump_dom(chromium_binary, out / "index.html"))[1] == 1
