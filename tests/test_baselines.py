"""Issue 23: the majority-class and linear-on-pixels baselines, their bound, and the warning."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import digits_at
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from imgpipe.learn import baselines
from imgpipe.learn import jobs as experiment
from imgpipe.learn.baseline_warning import likely_causes, warning_line
from imgpipe.learn.baselines import (
    SAMPLE_MAX,
    fit_plan,
    labelled_input_baselines,
    linear_pixels_baseline,
    majority_baseline,
    stratified_sample,
)
from imgpipe.learn.cv import summarise_cv
from imgpipe.stages.cv import run_cv_fold

# The documented bound of the linear baseline's time (README, "Baselines").
BOUND_SECONDS = 20.0


def sklearn_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 over the tested classes, straight from scikit-learn."""
    tested = np.unique(y_true)
    return {
        "accuracy": accuracy_score(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred)
        if set(np.unique(y_pred)) <= set(tested)
        else float(np.mean([np.mean(y_pred[y_true == c] == c) for c in tested])),
        "f1_macro": f1_score(y_true, y_pred, labels=tested, average="macro", zero_division=0),
    }


def assert_scores(found: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, abs=1e-12), key


# ----------------------------------------------------------------------------- (a) = scikit-learn


def test_majority_baseline_equals_sklearns_most_frequent_dummy():
    rng = np.random.default_rng(0)
    y_train = rng.choice(4, 300, p=[0.1, 0.5, 0.3, 0.1])
    y_test = rng.choice(4, 120, p=[0.4, 0.2, 0.2, 0.2])
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((300, 1)), y_train)
    expected = sklearn_scores(y_test, dummy.predict(np.zeros((120, 1))))
    found = majority_baseline(y_train, y_test, ["a", "b", "c", "d"])
    assert found["class"] == "b"  # the most common TRAINING class, not the test set's
    assert_scores(found, expected)


def test_majority_baseline_averages_over_the_tested_classes_only():
    # Class "c" has no test image: it is left out of the macro averages, as for the model.
    found = majority_baseline(np.array([0, 0, 1, 2]), np.array([0, 1, 1]), ["a", "b", "c"])
    assert found["balanced_accuracy"] == pytest.approx(0.5)
    assert found["accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("size, channels", [(8, 1), (32, 3)])
def test_linear_baseline_equals_a_direct_sklearn_fit(size, channels):
    images, labels = digits_at(size, 700)
    if channels == 3:
        images = np.repeat(images, 3, axis=3)
        images[..., 1] = 255 - images[..., 1]  # colour channels that differ
    train, test = np.arange(500), np.arange(500, 700)
    found = linear_pixels_baseline(images[train], labels[train], images[test], labels[test])
    side = min(16, size)

    def features(x):
        small = [cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA) for im in x]
        return np.stack(small).reshape(len(x), -1).astype(np.float32) / 255.0

    direct = make_pipeline(StandardScaler(), LogisticRegression(max_iter=found["max_iter"]))
    direct.fit(features(images[train]), labels[train])
    expected = sklearn_scores(labels[test], direct.predict(features(images[test])))
    assert_scores(found, expected)
    assert found["size"] == side and found["n_train_used"] == 500
    assert found["accuracy"] > 0.8  # the digits are nearly linearly separable


def test_linear_baseline_is_deterministic_given_the_seed():
    images, labels = digits_at(8, 400)
    runs = [linear_pixels_baseline(images[:300], labels[:300], images[300:], labels[300:])]
    runs.append(linear_pixels_baseline(images[:300], labels[:300], images[300:], labels[300:]))
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------- (b) the bound


def test_linear_baseline_stays_under_its_bound_on_a_large_training_role():
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (50_000, 16, 16, 1), dtype=np.uint8)
    y_train = rng.integers(0, 10, 50_000)
    x_test = rng.integers(0, 256, (2_000, 16, 16, 1), dtype=np.uint8)
    y_test = rng.integers(0, 10, 2_000)
    started = time.perf_counter()
    found = linear_pixels_baseline(x_train, y_train, x_test, y_test)
    assert time.perf_counter() - started < BOUND_SECONDS
    assert found["n_train_used"] == SAMPLE_MAX and found["n_train"] == 50_000
    assert found["n_test"] == 2_000


def test_stratified_sample_keeps_the_class_shares_and_every_class():
    labels = np.repeat([0, 1, 2, 3], [9_000, 900, 95, 5])
    sample = stratified_sample(labels, 1_000, seed=0)
    assert len(sample) == 1_000 and len(np.unique(sample)) == 1_000
    assert np.bincount(labels[sample]).tolist() == [900, 90, 9, 1]
    assert np.array_equal(sample, stratified_sample(labels, 1_000, seed=0))
    assert not np.array_equal(sample, stratified_sample(labels, 1_000, seed=1))
    assert len(stratified_sample(labels, 20_000)) == len(labels)  # small sets: all of them


def test_many_classes_shrink_iterations_then_sample_then_skip():
    assert fit_plan(50_000, 256, 10, SAMPLE_MAX) == (SAMPLE_MAX, baselines.MAX_ITER)
    images, iterations = fit_plan(50_000, 768, 600, SAMPLE_MAX)
    assert images < SAMPLE_MAX and iterations == baselines.MIN_ITER
    assert images * 768 * 600 * iterations <= baselines.WORK_MAX
    assert fit_plan(50_000, 768, 5_000, SAMPLE_MAX) is None
    y = np.arange(5_000).repeat(2)
    x = np.zeros((len(y), 16, 16, 3), np.uint8)
    assert "too many" in linear_pixels_baseline(x, y, x[:3], y[:3])["skipped"]


def test_baselines_that_cannot_run_say_why():
    x = np.zeros((10, 8, 8, 1), np.uint8)
    one_class = linear_pixels_baseline(x, np.zeros(10), x, np.arange(10) % 2)
    assert "single class" in one_class["skipped"]
    assert "no test image" in linear_pixels_baseline(x, np.arange(10) % 2, x[:0], [])["skipped"]
    assert "no training image" in majority_baseline([], [0, 1], ["a", "b"])["skipped"]


# ----------------------------------------------------------------------------- the warning


def history(epochs: int, steps_per_epoch: int, **columns) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"epoch": range(epochs), "step": [steps_per_epoch * (e + 1) - 1 for e in range(epochs)]}
    )
    return frame.assign(**columns)


def test_warning_names_only_the_causes_the_files_show():
    beaten = {"majority": {"balanced_accuracy": 0.2}, "linear_pixels": {"accuracy": 0.6}}
    model = {"accuracy": 0.374, "balanced_accuracy": 0.167}
    healthy = history(30, 40, val_loss=np.linspace(1.0, 0.3, 30), lr=np.linspace(0.01, 0.0, 30))
    assert likely_causes(healthy, {"stopped_early": False}) == []
    line = warning_line(model, beaten, [])
    assert "0.167 is not above the majority class's 0.200" in line
    assert "accuracy 0.374 is below logistic regression on the pixels' 0.600" in line

    rising = np.linspace(0.001, 0.008, 6)
    weak = history(6, 10, val_loss=[1.0, 0.5, 0.8, 1.2, 1.6, 2.0], lr=rising)
    causes = likely_causes(weak, {"stopped_early": True})
    assert causes[0] == "only 60 optimizer steps (6 epochs of 10)"
    assert "still warming up" in causes[1]
    assert "diverging" in causes[2] and "4.0x" in causes[2]
    assert "likely causes: only 60 optimizer steps" in warning_line(model, beaten, causes)
    # A model above both baselines: no warning, whatever its history.
    assert warning_line({"accuracy": 0.9, "balanced_accuracy": 0.9}, beaten, causes) is None


# ----------------------------------------------------------------------------- predict


def test_predict_majority_comes_from_the_models_training_counts_when_stored():
    truth = np.array([0, 0, 1, 1, 1])
    stored = labelled_input_baselines(truth, ["a", "b"], {"train_class_counts": {"a": 9, "b": 1}})
    assert stored["majority"]["class"] == "a" and stored["majority"]["accuracy"] == 0.4
    assert stored["majority"]["from"] == "the model's training images"
    assert "skipped" in stored["linear_pixels"]
    own = labelled_input_baselines(truth, ["a", "b"], {})
    assert own["majority"]["class"] == "b" and own["majority"]["from"].startswith("this labelled")


# ----------------------------------------------------------------------------- cross-validation


def test_each_fold_and_the_cv_summary_carry_the_baselines(tmp_path, monkeypatch):
    from helpers.fold_jobs import fold_job

    job, index, folds = fold_job(tmp_path, None)
    labels = index["label"].astype(int).to_numpy()
    seen = {}

    def fake_training(data, train_ids, val_ids, *args, **kw):
        seen["train"] = train_ids
        return {"best_epoch": 0, "epochs": 1}

    def one_class(model_path, images, ids, **loading):  # a collapsed model: always class 0
        return np.tile([20.0, 0.0, 0.0, 0.0], (len(ids), 1))  # its logits

    monkeypatch.setattr(experiment, "run_training", fake_training)
    monkeypatch.setattr("imgpipe.infer.inference.predict_logits", one_class)
    summaries, oofs = [], []
    for fold in range(3):
        job.wildcards["fold"] = str(fold)
        job.output["oof"] = str(tmp_path / f"f{fold}" / "oof.csv")
        job.output["summary"] = str(tmp_path / f"f{fold}" / "s.json")
        summary = run_cv_fold(job)
        held = np.sort(folds.loc[folds["fold"] == fold, "id"].to_numpy())
        expected = majority_baseline(labels[seen["train"]], labels[held], ["0", "1", "2", "3"])
        assert summary["baselines"]["majority"] == expected
        linear = summary["baselines"]["linear_pixels"]
        assert linear["n_train"] == len(seen["train"]) and linear["n_test"] == len(held)
        assert json.loads(open(job.output["summary"]).read())["baselines"] == summary["baselines"]
        summaries.append(job.output["summary"])
        oofs.append(job.output["oof"])
    names = ("summary", "oof", "suspects", "suspects_png")
    outputs = {name: str(tmp_path / "cv" / f"{name}.out") for name in names}
    table = summarise_cv(str(tmp_path / "index.csv"), oofs, summaries, outputs)
    assert {"baseline_majority_accuracy", "baseline_linear_accuracy"} <= set(table.columns)
    assert table["fold"].tolist() == ["0", "1", "2", "mean", "std"]
    assert table["baseline_linear_accuracy"].iloc[3] > table["accuracy"].iloc[3]


def test_predict_command_warns_when_a_collapsed_model_scores_a_labelled_tree(
    tmp_path, monkeypatch, capsys
):
    from helpers.workflow_utils import digits_tree

    from imgpipe import cli
    from imgpipe.infer import inference as predict_module
    from imgpipe.infer.inference import Model

    tree = digits_tree(tmp_path / "digits", per_class=10, classes=4, size=16)
    metadata = {
        "class_names": ["0", "1", "2", "3"],
        "image": {"size": 16, "mode": "gray", "fit": "pad"},
        "train_class_counts": {"0": 5, "1": 30, "2": 5, "3": 5},  # "1" was the majority
    }

    def always_one(images):  # a collapsed model: class "1" for every image
        return np.tile([0.0, 1.0, 0.0, 0.0], (len(images), 1))

    model = Model("collapsed.ckpt", "checkpoint", "cpu", metadata, always_one)
    monkeypatch.setattr(predict_module, "load_model", lambda *a, **kw: model)
    out = tmp_path / "out" / "predictions.csv"
    assert cli.main(["predict", "collapsed.ckpt", str(tree), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "majority-class baseline (1, from the model's training images): accuracy 0.2500" in (
        printed
    )
    assert "warning: the model does not beat the baselines: balanced accuracy 0.250" in printed
    summary = json.loads((tmp_path / "out" / "predictions.metrics.json").read_text())
    assert summary["baselines"]["majority"]["class"] == "1"
    assert "does not beat" in summary["warning"]


class LargeImages:
    """6,000 photos of 224 px made on demand, recording how many each read asked for."""

    shape = (6_000, 224, 224, 3)

    def __init__(self):
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, positions):
        self.reads.append(len(positions))
        out = np.empty((len(positions), *self.shape[1:]), np.uint8)
        out[...] = (np.asarray(positions) % 251).astype(np.uint8)[:, None, None, None]
        return out


def test_large_images_are_read_a_bounded_chunk_at_a_time():
    images, labels = LargeImages(), np.arange(6_000) % 3
    found = linear_pixels_baseline(images, labels, images, labels)
    assert found["n_train_used"] == SAMPLE_MAX and found["size"] == 16
    row_bytes = 224 * 224 * 3
    assert max(images.reads) * row_bytes <= baselines.CHUNK_BYTES
    # The sample and the test images, each read once.
    assert sum(images.reads) == SAMPLE_MAX + 6_000
