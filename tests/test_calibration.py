"""Calibrated probabilities: the temperature's fit, ECE / NLL, the model file, the exports, the demo run."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY

from imgpipe.core.errors import DataError
from imgpipe.infer.export import export_onnx, export_torchscript
from imgpipe.infer.inference import load_model, predict_logits, predict_proba
from imgpipe.learn.calibration import (
    T_MIN,
    apply_temperature,
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_table,
    softmax,
)
from imgpipe.learn.fit import fit
from imgpipe.learn.trainer import save_torch

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(srun|LeafSpec|logging interval|on_after_batch_transfer|all_gather is deprecated)"
)


def sampled(n: int, classes: int, sharpness: float, seed: int = 0):
    """True logits, labels drawn from softmax(true logits), and a model's logits ``sharpness`` x them."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, 2.0, (n, classes))
    probs = softmax(true)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return true, labels, sharpness * true


# ----------------------------------------------------------------------------- the functions


def test_an_overconfident_model_gets_a_temperature_above_one_and_a_lower_nll():
    true, labels, logits = sampled(4000, 5, sharpness=3.0)
    found = fit_temperature(logits, labels)
    assert 2.5 < found < 3.5  # the model's logits are 3x the true ones
    assert nll(logits, labels, found) < nll(logits, labels, 1.0)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(calibrated_probabilities(logits, found), labels)
    assert after < before / 2


def test_an_underconfident_model_gets_a_temperature_below_one():
    _, labels, logits = sampled(4000, 5, sharpness=0.4)
    assert 0.3 < fit_temperature(logits, labels) < 0.5


def test_the_fit_is_deterministic_and_bounded():
    _, labels, logits = sampled(500, 3, sharpness=2.0)
    assert fit_temperature(logits, labels) == fit_temperature(logits.copy(), labels.copy())
    # Every image right with a margin: NLL falls without end as T -> 0 (to 0 in float64 long
    # before T_MIN); the search stays within its bounds, at a T that makes the model very sure.
    separable = np.eye(3)[labels] * 5.0
    found = fit_temperature(separable, labels)
    assert T_MIN <= found < 0.25 and nll(separable, labels, found) < 1e-8


def test_perfectly_calibrated_probabilities_have_an_ece_near_zero():
    rng = np.random.default_rng(1)
    n = 200_000
    confidence = rng.uniform(0.5, 1.0, n)
    probs = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.where(rng.random(n) < confidence, 0, 1)  # right with probability = confidence
    assert expected_calibration_error(probs, labels) < 0.01
    # Always sure, right half of the time: ECE = 0.5.
    assert expected_calibration_error(np.tile([[1.0, 0.0]], (10, 1)), np.arange(10) % 2) == 0.5


def test_the_temperature_never_changes_the_argmax():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 5, (1000, 7))
    for temperature in (T_MIN, 0.3, 1.0, 2.7, 20.0):
        scaled = calibrated_probabilities(logits, temperature)
        assert (scaled.argmax(axis=1) == logits.argmax(axis=1)).all()
    tensor = torch.from_numpy(logits)
    assert torch.equal(apply_temperature(tensor, 2.0), tensor / 2.0)


def test_reliability_table_bins_by_confidence():
    probs = np.array([[0.95, 0.05], [0.55, 0.45], [0.52, 0.48], [0.1, 0.9]])
    table = reliability_table(probs, np.array([0, 1, 0, 1]), bins=10)
    assert list(table.columns) == ["bin", "count", "confidence", "accuracy"]
    assert table["count"].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 1, 1]
    assert table.loc[5, "confidence"] == pytest.approx(0.535)
    assert table.loc[5, "accuracy"] == 0.5 and table.loc[9, "accuracy"] == 1.0
    assert math.isnan(table.loc[0, "accuracy"])


@pytest.mark.parametrize("bad", [0, -1.5, float("nan"), float("inf"), "2", True, None])
def test_a_bad_temperature_is_one_line(bad):
    with pytest.raises(DataError, match=r"^temperature is .*, expected a finite number > 0$"):
        apply_temperature(np.zeros((1, 2)), bad)


def test_bad_logits_are_one_line():
    with pytest.raises(DataError, match="non-finite"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(DataError, match="labels outside"):
        nll(np.zeros((2, 2)), np.array([0, 2]))


# ----------------------------------------------------------------------------- a trained model


def roles_of(n: int) -> dict[str, np.ndarray]:
    """Fixed train / val / test ids of ``n`` images (60 / 20 / 20 %)."""
    ids = np.arange(n)
    return {"train": ids[ids % 5 > 1], "val": ids[ids % 5 == 0], "test": ids[ids % 5 == 1]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits16):
    """The demo's digits (conftest's 500 at 16 px) and a tiny model fitted with validation images."""
    base = tmp_path_factory.mktemp("calibrated")
    images, labels = digits16
    roles = roles_of(len(images))
    train_cfg = {**copy.deepcopy(TINY["train"]), "max_epochs": 6, "lr": 0.02}
    summary = fit(
        images,
        labels,
        roles["train"],
        roles["val"],
        None,
        None,
        copy.deepcopy(TINY["model"]),
        train_cfg,
        base / "model",
        class_names=[str(c) for c in range(10)],
        image_cfg={"size": 16, "mode": "gray", "fit": "pad"},
    )
    return {
        "ckpt": base / "model" / "model.ckpt",
        "images": images,
        "labels": labels,
        "roles": roles,
        **summary,
    }


def read(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_fits_the_temperature_on_the_validation_images(trained):
    state = read(trained["ckpt"])
    temperature = state["hyper_parameters"]["temperature"]
    assert temperature == trained["temperature"] != 1.0
    assert state["imgpipe"]["temperature"] == temperature
    assert "validation images" in trained["temperature_fitted_on"]
    assert trained["val_nll_after"] <= trained["val_nll_before"]
    # It is the fit of the model file's own logits on the validation images.
    val = trained["roles"]["val"]
    logits = predict_logits(trained["ckpt"], trained["images"], ids=val)
    assert fit_temperature(logits, trained["labels"][val]) == pytest.approx(temperature)


def test_predictions_are_the_calibrated_softmax_of_the_logits(trained):
    logits = predict_logits(trained["ckpt"], trained["images"])
    probs = predict_proba(trained["ckpt"], trained["images"])
    expected = calibrated_probabilities(logits, trained["temperature"])
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert (probs.argmax(axis=1) == logits.argmax(axis=1)).all()
    model = load_model(trained["ckpt"])
    np.testing.assert_allclose(model.probabilities(trained["images"][:20]), probs[:20], atol=1e-6)


def test_a_model_file_without_a_temperature_loads_as_one(trained, tmp_path):
    state = read(trained["ckpt"])
    del state["hyper_parameters"]["temperature"]
    del state["imgpipe"]["temperature"]
    old = tmp_path / "old.ckpt"
    save_torch(state, old)
    assert load_model(old).module.temperature == 1.0
    np.testing.assert_allclose(
        predict_proba(old, trained["images"][:10]),
        softmax(predict_logits(old, trained["images"][:10])),
        atol=1e-6,
    )


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan"), "hot", [1.0]])
def test_a_bad_temperature_in_a_model_file_is_refused_in_one_line(trained, tmp_path, bad):
    state = read(trained["ckpt"])
    state["hyper_parameters"]["temperature"] = bad
    path = tmp_path / "bad.ckpt"
    save_torch(state, path)
    with pytest.raises(DataError) as err:
        load_model(path)
    assert "temperature is" in str(err.value) and "\n" not in str(err.value)


def test_the_exports_give_the_calibrated_probabilities(trained, tmp_path):
    # A temperature far from 1, so that an export without it could not pass.
    state = read(trained["ckpt"])
    state["hyper_parameters"]["temperature"] = 3.5
    hot = tmp_path / "model.ckpt"
    save_torch(state, hot)
    model = load_model(hot)
    onnx_meta = export_onnx(model, tmp_path / "model.onnx")
    script_meta = export_torchscript(model, tmp_path / "model.pt")
    batch = trained["images"][:32]
    expected = calibrated_probabilities(predict_logits(hot, batch), 3.5)
    for path, meta in ((tmp_path / "model.onnx", onnx_meta), (tmp_path / "model.pt", script_meta)):
        assert meta["temperature"] == 3.5
        found = load_model(path, trust_torchscript=True).probabilities(batch)
        np.testing.assert_allclose(found, expected, atol=1e-5)


def test_on_the_demo_digits_the_test_ece_falls_and_no_prediction_changes(trained):
    test = trained["roles"]["test"]
    labels = trained["labels"][test]
    logits = predict_logits(trained["ckpt"], trained["images"], ids=test)
    probs = predict_proba(trained["ckpt"], trained["images"], ids=test)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(probs, labels)
    assert after <= before
    assert nll(logits, labels, trained["temperature"]) <= nll(logits, labels, 1.0)
    assert (probs.argmax(axis=1) == logits.argmax(axis=1)).all()


# ----------------------------------------------------------------------------- the demo run


def test_the_tiny_run_is_calibrated_without_changing_a_prediction(finished_run, monkeypatch):
    # The shared tiny run (3 epochs, 16 test images, accuracy ~0.4) is too small to show
    # the ECE fall (the digits test above does); here: where T comes from, what is written.
    results = finished_run / "results"
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    calibration = metrics["calibration"]
    assert calibration["bins"] == 15 and calibration["n"] == metrics["n_test"]
    assert len(calibration["reliability"]["before"]) == 15
    # The final model (train + val, after the sweep) takes the winning trial's temperature.
    best = yaml.safe_load((results / "sweep" / "best.yaml").read_text())
    state = read(results / "train" / "final" / "model.ckpt")
    assert state["hyper_parameters"]["temperature"] == best["temperature"]
    assert calibration["temperature"] == best["temperature"]
    assert best["trial"] in calibration["fitted_on"]
    # The folds follow the final model's rule: after a sweep, the winner's temperature.
    fold = json.loads((results / "cv" / "fold-0" / "summary.json").read_text())
    assert fold["temperature"] == best["temperature"]
    assert fold["calibration"]["n"] == fold["n_held_out"]
    cv = pd.read_csv(results / "cv" / "summary.csv")
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(cv.columns)
    # The argmax never changes: the written predictions are those of the raw logits.
    split = pd.read_csv(results / "split" / "split.csv")
    test_ids = np.sort(split.loc[split["role"] == "test", "id"].to_numpy())
    from imgpipe.data.dataset import class_names, load_index, open_images

    monkeypatch.chdir(finished_run)  # the index names its shards relative to the run
    index = load_index(results / "clean" / "index.csv")
    logits = predict_logits(
        results / "train" / "final" / "model.ckpt", open_images(index), ids=test_ids
    )
    predictions = pd.read_csv(results / "evaluate" / "predictions.csv", dtype={"predicted": str})
    names = np.asarray(class_names(index))
    assert predictions["predicted"].tolist() == names[logits.argmax(axis=1)].tolist()
    report = (results / "report" / "index.html").read_text()
    assert "Reliability diagram" in report and "Expected calibration error" in report


def test_the_report_shows_the_calibration_and_its_reliability_diagram(tmp_path):
    from imgpipe.learn.calibration import calibration_summary
    from imgpipe.report import headline
    from imgpipe.report.model_sections import test_section

    _, labels, logits = sampled(300, 3, sharpness=3.0)
    calibration = calibration_summary(
        logits, labels, fit_temperature(logits, labels), "the 300 validation images"
    )
    metrics = {"accuracy": 0.9, "n_test": 300, "calibration": calibration}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    page = test_section({"test_metrics": str(path)})
    assert "Reliability diagram on the 300 test images" in page
    assert "fitted by minimising the negative log-likelihood on the 300 validation images" in page
    assert "Expected calibration error" in page and "data:image/png;base64," in page
    test = headline({"test_metrics": str(path)})["test"]
    assert test["ece_before"] == calibration["ece_before"] > test["ece_after"]
