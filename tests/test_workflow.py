"""Workflow tests: real snakemake runs on private copies of the workflow.

Foundation: a tree with planted defects goes through list_images -> ingest -> clean and every
defect is rejected for its own reason while odd-but-valid files are kept. Rerun scope: on one
finished tiny run, a single config or code tweak schedules exactly the rules that depend on it.
Report: `snakemake --report` shows every result category. Dry run: the default config plans the
whole DAG.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers.imagefactory import (
    write_cmyk_jpeg,
    write_exif_rotated_jpeg,
    write_palette_png,
    write_png,
    write_rgba_png,
    write_text_as_png,
    write_truncated,
    write_zero_byte,
)
from helpers.workflow_utils import (
    REPO,
    TINY_CONFIG,
    copy_workflow,
    deep_merge,
    planned_jobs,
    snakemake,
    tree_digest,
    write_config,
)
from test_report import report_categories

from imgpipe.stages.demo import digits_images

CLEAN_TARGET = "results/clean/index.csv"
TRAINING_RULES = {"sweep_trial", "cv_fold", "train_final"}

# ----------------------------------------------------------------------------- planted tree

BASE_CLASSES = ("0", "1", "2", "3")
BASE_PER_CLASS = 8


def _digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits_images()
    return images, labels


def _digit(label: int, n: int) -> np.ndarray:
    """The n-th 8x8 digit of a class (native size: sharp, never blurry)."""
    images, labels = _digits()
    return images[np.flatnonzero(labels == label)[n]]


def _colour(gray: np.ndarray, side: int = 32) -> np.ndarray:
    """A sharp RGB rendering of a grey digit (nearest-neighbour upscale, distinct channels)."""
    big = cv2.resize(gray, (side, side), interpolation=cv2.INTER_NEAREST)
    return np.stack([big, 255 - big, big // 2 + 60], axis=-1).astype(np.uint8)


def _noise(low: int, high: int, side: int = 32) -> np.ndarray:
    return np.random.default_rng(1).integers(low, high, (side, side), dtype=np.uint8)


def planted_tree(root: Path) -> tuple[set[tuple[str, str]], set[str]]:
    """Write a small digits tree with planted defects and odd-but-valid files under ``root``.

    Returns the expected (relpath, reason) rows of rejected.csv and the expected relpaths of
    index.csv (with ``near_duplicates: group``).
    """
    kept: set[str] = set()
    for label in BASE_CLASSES:
        for n in range(BASE_PER_CLASS):
            write_png(root / label / f"{n:03d}.png", _digit(int(label), n))
            kept.add(f"{label}/{n:03d}.png")

    # Broken files: refused while listing or decoding.
    write_truncated(root / "0" / "cut.png", "png")
    write_truncated(root / "0" / "cut.jpg", "jpeg")
    write_zero_byte(root / "0" / "empty.png")
    write_text_as_png(root / "0" / "notes.png")
    write_png(root / "0" / ".hidden.png", _digit(0, 20))
    (root / "0" / "readme.txt").write_text("not an image\n", encoding="utf-8")

    # Decisions of the clean stage.
    shutil.copy2(root / "1" / "000.png", root / "1" / "dup.png")
    shutil.copy2(root / "2" / "005.png", root / "3" / "conflict.png")
    kept.discard("2/005.png")
    near = _digit(2, 0).copy()
    near[3, 3] = min(255, int(near[3, 3]) + 12)
    write_png(root / "2" / "near.png", near)
    kept.add("2/near.png")
    write_png(root / "1" / "constant.png", np.full((16, 16), 128, np.uint8))
    write_png(root / "1" / "dark.png", _noise(0, 16))
    write_png(root / "1" / "bright.png", _noise(240, 256))
    smooth = cv2.resize(_digit(3, 20), (64, 64), interpolation=cv2.INTER_CUBIC)
    write_png(root / "3" / "blurry.png", cv2.GaussianBlur(smooth, (0, 0), 3))
    write_png(root / "3" / "small.png", cv2.resize(_digit(3, 21), (6, 6)))
    write_png(root / "3" / "wide.png", np.tile(_digit(3, 22), (1, 12)))
    write_png(root / "lonely" / "only.png", _digit(9, 0))

    # Odd but valid: every one kept (distinct digits, so no duplicates among them).
    write_cmyk_jpeg(root / "0" / "cmyk.jpg", _colour(_digit(5, 0)))
    write_png(root / "0" / "deep16.png", _digit(5, 1).astype(np.uint16) * 257)
    write_palette_png(
        root / "1" / "palette.png",
        cv2.resize(_digit(6, 0) // 64, (24, 24), interpolation=cv2.INTER_NEAREST),
        np.array([[0, 0, 0], [200, 30, 30], [30, 200, 30], [250, 250, 250]]),
    )
    rgba = np.concatenate([_colour(_digit(6, 1)), np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    rgba[:4, :4, 3] = 0
    write_rgba_png(root / "1" / "alpha.png", rgba)
    upright = cv2.resize(_colour(_digit(7, 0)), (40, 24), interpolation=cv2.INTER_NEAREST)
    write_exif_rotated_jpeg(root / "2" / "rotated.jpg", 6, upright)
    write_png(root / "2" / "with space.png", _digit(7, 1))
    write_png(root / "3" / "ünïcødé 数字.png", _digit(8, 0))
    kept |= {
        "0/cmyk.jpg",
        "0/deep16.png",
        "1/palette.png",
        "1/alpha.png",
        "2/rotated.jpg",
        "2/with space.png",
        "3/ünïcødé 数字.png",
    }

    rejected = {
        ("0/cut.png", "truncated"),
        ("0/cut.jpg", "truncated"),
        ("0/empty.png", "zero_byte"),
        ("0/notes.png", "not_image"),
        ("0/.hidden.png", "hidden"),
        ("0/readme.txt", "unsupported_extension"),
        ("1/dup.png", "exact_duplicate"),
        ("2/005.png", "label_conflict"),
        ("3/conflict.png", "label_conflict"),
        ("1/constant.png", "low_information"),
        ("1/dark.png", "too_dark"),
        ("1/bright.png", "too_bright"),
        ("3/blurry.png", "blurry"),
        ("3/small.png", "too_small"),
        ("3/wide.png", "odd_aspect"),
        ("lonely/only.png", "small_class"),
    }
    return rejected, kept


def _rows(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv, dtype=str, keep_default_na=False)


def _reasons(workdir: Path) -> set[tuple[str, str]]:
    table = _rows(workdir / "results" / "clean" / "rejected.csv")
    return set(zip(table["relpath"], table["reason"], strict=True))


def _new_workdir(tmp_path: Path, extra: dict | None = None) -> Path:
    workdir = copy_workflow(tmp_path / "wf")
    write_config(workdir, deep_merge({"data": {"root": "data"}}, extra or {}))
    return workdir


def _ran_rules(proc) -> set[str]:
    """Rules snakemake started jobs of (from its log on stderr)."""
    return set(re.findall(r"^(?:local)?rule (\w+):", proc.stderr, re.MULTILINE))


@pytest.mark.slow
def test_planted_defects_rejected_for_their_reason_and_valid_oddities_kept(tmp_path):
    workdir = _new_workdir(tmp_path)
    expected_rejected, expected_kept = planted_tree(workdir / "data")
    before = tree_digest(workdir / "data")

    snakemake(workdir, CLEAN_TARGET)

    assert _reasons(workdir) == expected_rejected
    index = _rows(workdir / "results" / "clean" / "index.csv")
    assert set(index["relpath"]) == expected_kept
    assert list(index["id"]) == [str(i) for i in range(len(index))]
    by_path = dict(zip(index["relpath"], index["group"], strict=True))
    assert by_path["2/near.png"] == by_path["2/000.png"]  # near duplicate: same group, kept
    assert len(set(by_path.values())) == len(by_path) - 1  # and no other grouping
    summary = json.loads((workdir / "results" / "clean" / "summary.json").read_text())
    assert summary["rejected_per_reason"] == Counter(r for _, r in expected_rejected)
    assert sum(summary["kept_per_class"].values()) == len(expected_kept)
    assert summary["near_duplicates"]["groups_above_one"] == 1
    assert tree_digest(workdir / "data") == before

    # Dropping near duplicates reruns only the clean decisions and rejects the planted one.
    write_config(workdir, {"clean": {"near_duplicates": "drop"}})
    assert planned_jobs(workdir, CLEAN_TARGET) == Counter({"clean": 1})
    snakemake(workdir, CLEAN_TARGET)
    assert _reasons(workdir) == expected_rejected | {("2/near.png", "near_duplicate")}
    index = _rows(workdir / "results" / "clean" / "index.csv")
    assert set(index["relpath"]) == expected_kept - {"2/near.png"}
    assert tree_digest(workdir / "data") == before


def test_missing_data_root_stops_before_any_job(tmp_path):
    workdir = _new_workdir(tmp_path, {"data": {"root": "no/such/folder"}})
    proc = snakemake(workdir, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count("data.root") == 1, output
    assert "no/such/folder" in output
    assert _ran_rules(proc) == set()
    assert not (workdir / "results").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("single_class", "only 1 class ('0') survived cleaning"),
        ("empty", "no image survived cleaning (0 listed"),
    ],
)
def test_untrainable_tree_stops_at_clean_with_a_clear_message(tmp_path, layout, message):
    workdir = _new_workdir(tmp_path, deep_merge(TINY_CONFIG, {"data": {"root": "data"}}))
    (workdir / "data").mkdir()
    if layout == "single_class":
        for n in range(6):
            write_png(workdir / "data" / "0" / f"{n}.png", _digit(0, n))
    proc = snakemake(workdir, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr or message in (workdir / "logs" / "clean.log").read_text()
    assert message in (workdir / "logs" / "clean.log").read_text()
    ran = _ran_rules(proc)
    assert "clean" in ran
    assert ran.isdisjoint(TRAINING_RULES | {"split", "augment"}), ran
    assert not (workdir / "results" / "clean" / "index.csv").exists()


# ----------------------------------------------------------------------------- dry run of the default config


def _rule_names() -> set[str]:
    """Every rule the workflow defines (from the Snakefile and the rule files)."""
    files = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    return {name for f in files for name in re.findall(r"^\s*rule (\w+):", f.read_text(), re.M)}


# Rules outside the default target: run by name (export) or only when configured (predict;
# fetch_weights: model.weights names pretrained weights, tests/test_pretrained.py).
OPT_IN_RULES = {"export", "predict", "fetch_weights"}


def test_default_config_plans_the_whole_dag(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    trials = int(np.prod([len(values) for values in config["sweep"]["grid"].values()]))
    planned = planned_jobs(
        tmp_path,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(tmp_path),
        "--configfile",
        str(REPO / "config" / "config.yaml"),
    )
    # export is asked for by name; predict exists only with a predict section.
    assert set(planned) == _rule_names() - OPT_IN_RULES
    assert planned["sweep_trial"] == trials == 2
    assert planned["cv_fold"] == config["cv"]["k"] == 5
    assert planned["ingest_shard"] == config["ingest"]["shards"]
    assert planned["cluster"] == len(config["cluster"]["features"])
    singles = _rule_names() - OPT_IN_RULES - {"sweep_trial", "cv_fold", "ingest_shard", "cluster"}
    assert all(planned[rule] == 1 for rule in singles), planned
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- rerun scope


# Rules downstream of the final model / of the sweep winner, with their job counts.
AFTER_TRAINING = Counter(
    {"train_final": 1, "cv_fold": 2, "cv_summary": 1, "evaluate": 1, "cluster": 1}
)
REPORT_ONLY = Counter({"report": 1, "all": 1})
AFTER_FINAL = Counter({"train_final": 1, "evaluate": 1, "cluster": 1})
# Any config change rewrites the config snapshot, which the report shows.
REPORTING = REPORT_ONLY + Counter({"config_snapshot": 1})
AFTER_SWEEP = Counter({"sweep_trial": 2, "sweep_aggregate": 1}) + AFTER_TRAINING
AFTER_AUGMENT = Counter({"augment": 1}) + AFTER_SWEEP
AFTER_CLEAN = Counter({"clean": 1, "split": 1, "cv_assign": 1, "cluster": 1}) + AFTER_AUGMENT


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"train": {"weight_decay": 0.001}}, AFTER_SWEEP + REPORTING),
        ({"model": {"dropout": 0.1}}, AFTER_SWEEP + REPORTING),
        ({"clean": {"blur": 0.2}}, AFTER_CLEAN + REPORTING),
        ({"augment": {"copies": 2}}, AFTER_AUGMENT + REPORTING),
        ({"cluster": {"n_init": 3}}, Counter({"cluster": 2}) + REPORTING),
        ({"report": {"title": "another title"}}, REPORTING),
        # The final model's layout: trials and folds train in one process whatever it is.
        ({"train": {"num_workers": 1}}, AFTER_FINAL + REPORTING),
        ({"train": {"num_nodes": 2, "gpus_per_node": 2}}, AFTER_FINAL + REPORTING),
    ],
    ids=[
        "train.weight_decay",
        "model.dropout",
        "clean.blur",
        "augment.copies",
        "cluster.n_init",
        "report.title",
        "train.num_workers",
        "train.num_nodes",
    ],
)
def test_one_config_key_reruns_exactly_its_downstream(finished_copy, change, expected):
    write_config(finished_copy, change)
    assert planned_jobs(finished_copy) == expected


@pytest.mark.slow
def test_new_grid_value_schedules_only_the_new_trial(finished_copy):
    grid = yaml.safe_load((finished_copy / "config" / "config.yaml").read_text())["sweep"]["grid"]
    write_config(finished_copy, {"sweep": {"grid": {"train.lr": [*grid["train.lr"], 0.05]}}})
    expected = Counter({"sweep_trial": 1, "sweep_aggregate": 1}) + AFTER_TRAINING + REPORTING
    assert planned_jobs(finished_copy) == expected
    # The one scheduled trial is the new value's: existing trials keep their results.
    dry = snakemake(finished_copy, "-n")
    trials = re.findall(r"wildcards: trial=(\S+)", dry.stdout + dry.stderr)
    assert trials == ["lr~0.05"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "expected"),
    [
        # Each rule's fingerprint covers the modules its script imports, transitively.
        ("images/quality.py", AFTER_CLEAN + REPORT_ONLY),
        ("report/page.py", REPORT_ONLY),
        # config_snapshot has its own module: a report edit reruns the report alone.
        ("stages/config_snapshot.py", REPORTING),
        ("learn/clustering.py", Counter({"cluster": 2}) + REPORT_ONLY),
        # Imported by the training jobs through imgpipe.learn.jobs (a hand-kept list missed it).
        # cv_assign shares its stage module (imgpipe/stages/cv.py) with the folds it plans,
        # so it reruns too; its folds.csv comes out the same.
        ("learn/sweep.py", AFTER_SWEEP + Counter({"cv_assign": 1}) + REPORT_ONLY),
    ],
)
def test_code_edit_reruns_the_rules_running_that_module(finished_copy, module, expected):
    source_file = finished_copy / "imgpipe" / module
    assert source_file.is_file(), f"{module} moved: name the module that holds this code now"
    with source_file.open("a", encoding="utf-8") as source:
        source.write("\n# an edit that changes the code fingerprint\n")
    assert planned_jobs(finished_copy) == expected


@pytest.mark.slow
def test_changed_or_added_images_plan_the_listing_again(finished_copy):
    # finished_copy has checked that the finished run plans nothing.
    image = finished_copy / "data" / "0" / "000.png"
    original, stat = image.read_bytes(), image.stat()
    # Replaced in place: no folder's mtime changes (the old stamp missed it).
    shutil.copyfile(finished_copy / "data" / "1" / "000.png", image)
    planned = planned_jobs(finished_copy)
    assert planned["list_images"] == 1 and planned["report"] == 1, planned
    image.write_bytes(original)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned_jobs(finished_copy) == Counter()  # the same tree again: nothing to do
    # Added two levels down: the fingerprint covers every depth.
    deeper = finished_copy / "data" / "2" / "2024" / "may"
    deeper.mkdir(parents=True)
    shutil.copyfile(finished_copy / "data" / "2" / "000.png", deeper / "new.png")
    assert planned_jobs(finished_copy)["list_images"] == 1


# ----------------------------------------------------------------------------- report

REPORT_CATEGORIES = {
    "Data",
    "Augmentation",
    "Training",
    "Sweep",
    "Cross-validation",
    "Test",
    "Clustering",
}


@pytest.mark.slow
def test_snakemake_report_shows_every_result_category(finished_run, tmp_path):
    report = tmp_path / "report.html"
    snakemake(finished_run, "--report", str(report))
    missing = REPORT_CATEGORIES - report_categories(report)
    assert not missing, f"categories missing from the report: {sorted(missing)}"
    assert planned_jobs(finished_run) == Counter()
