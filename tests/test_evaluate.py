import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

from imgpipe.core.errors import DataError
from imgpipe.data.split import assign_roles
from imgpipe.learn.metrics import classification_metrics, confusion_matrix_table, per_class_table
from imgpipe.stages.demo import digits_images
from imgpipe.stages.evaluate import (
    epoch_metrics,
    evaluate_predictions,
    plot_confusion,
    plot_training_curves,
    run_evaluate,
)
from imgpipe.workflow.stage_job import StageJob

PNG = b"\x89PNG\r\n\x1a\n"
NAMES = ["cat", "dog", "emu", "yak"]


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG
    assert len(data) > min_bytes


def test_metrics_by_hand():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(y_true, y_pred, NAMES)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    # cat: P 1/2 R 1/2; dog: P 2/3 R 1; emu: P 0 R 0; yak has no test image: not averaged
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1) / 3)
    assert m["balanced_accuracy"] == pytest.approx(m["recall_macro"])
    assert m["f1_macro"] == pytest.approx((1 / 2 + 0.8) / 3)
    assert m["classes_without_test_images"] == ["yak"] and m["classes_tested"] == 3
    assert m["per_class"]["dog"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert m["per_class"]["yak"]["support"] == 0
    json.dumps(m)  # plain values only


def test_macro_metrics_over_classes_that_were_tested():
    # Issue 11.3: a class without test images used to count as 0 (macro F1 0.667 at accuracy 1).
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), ["a", "b", "c"])
    assert m["accuracy"] == 1.0
    assert m["f1_macro"] == m["precision_macro"] == m["recall_macro"] == 1.0
    assert m["balanced_accuracy"] == 1.0
    assert m["classes_without_test_images"] == ["c"]


def test_metrics_equal_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 4, 300))
    m = classification_metrics(y_true, y_pred, NAMES)
    report = classification_report(
        y_true, y_pred, labels=range(4), target_names=NAMES, output_dict=True, zero_division=0
    )
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["precision_macro"] == pytest.approx(report["macro avg"]["precision"])
    assert m["recall_macro"] == pytest.approx(report["macro avg"]["recall"])
    assert m["f1_macro"] == pytest.approx(report["macro avg"]["f1-score"])
    table = per_class_table(y_true, y_pred, NAMES)
    assert table["class"].tolist() == NAMES
    for row in table.itertuples():
        expected = report[row._1]
        assert (row.precision, row.recall, row.f1) == pytest.approx(
            (expected["precision"], expected["recall"], expected["f1-score"])
        )
        assert row.support == expected["support"]


def test_confusion_table_is_labelled_and_equals_sklearn(tmp_path):
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    cm = confusion_matrix_table(y_true, y_pred, NAMES)
    assert cm.index.name == "true" and cm.columns.name == "predicted"
    assert cm.index.tolist() == NAMES and cm.columns.tolist() == NAMES
    assert np.array_equal(cm.to_numpy(), confusion_matrix(y_true, y_pred, labels=range(4)))
    assert cm.loc["emu", "cat"] == 1
    plot_confusion(cm, tmp_path / "cm.png")
    assert_png(tmp_path / "cm.png")


def test_confusion_plot_of_many_classes(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"class_{i}" for i in range(40)]
    cm = confusion_matrix_table(rng.integers(0, 40, 500), rng.integers(0, 40, 500), names)
    plot_confusion(cm, tmp_path / "cm.png")
    assert_png(tmp_path / "cm.png")
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]


def lightning_metrics_csv(path, epochs=4, steps_per_epoch=3):
    """A CSVLogger metrics.csv as Lightning writes it: sparse rows, lr rows without an epoch."""
    rows, step = [], 0
    for epoch in range(epochs):
        rows.append({"lr-AdamW": 0.01 / (epoch + 1), "step": step})
        for _ in range(steps_per_epoch):
            rows.append(
                {"epoch": epoch, "step": step, "train_loss_step": 2.0 - 0.3 * epoch + 0.01 * step}
            )
            step += 1
        rows.append(
            {
                "epoch": epoch,
                "step": step - 1,
                "val_loss": 1.5 - 0.2 * epoch,
                "val_acc": 0.5 + 0.1 * epoch,
            }
        )
        rows.append({"epoch": epoch, "step": step - 1, "train_loss_epoch": 1.9 - 0.3 * epoch})
    columns = [
        "epoch",
        "lr-AdamW",
        "step",
        "train_loss_epoch",
        "train_loss_step",
        "val_acc",
        "val_loss",
    ]
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def test_epoch_metrics_from_sparse_lightning_rows(tmp_path):
    lightning_metrics_csv(tmp_path / "metrics.csv")
    table = epoch_metrics(pd.read_csv(tmp_path / "metrics.csv"))
    assert table.index.tolist() == [0, 1, 2, 3]
    assert "train_loss_step" not in table and "step" not in table
    assert table["train_loss"].tolist() == pytest.approx([1.9, 1.6, 1.3, 1.0])
    assert table["val_acc"].tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert table["lr-AdamW"].tolist() == pytest.approx([0.01, 0.005, 0.01 / 3, 0.0025])


def test_step_losses_are_averaged_when_no_epoch_column_exists():
    history = pd.DataFrame(
        {
            "epoch": [0, 0, 0, 1, 1],
            "train_loss": [3.0, 1.0, np.nan, 2.0, np.nan],
            "val_acc": [np.nan, np.nan, 0.4, np.nan, 0.6],
        }
    )
    table = epoch_metrics(history)
    assert table["train_loss"].tolist() == [2.0, 2.0]
    assert table["val_acc"].tolist() == [0.4, 0.6]


@pytest.mark.parametrize("kind", ["lightning", "per_epoch", "empty"])
def test_training_curves_are_written(tmp_path, kind):
    history = tmp_path / "history.csv"
    if kind == "lightning":
        lightning_metrics_csv(history)
    elif kind == "per_epoch":  # the training stage's history.csv: one row per epoch
        pd.DataFrame(
            {
                "epoch": range(5),
                "step": range(10, 60, 10),
                "train_loss": np.linspace(2, 1, 5),
                "val_loss": np.linspace(2.2, 1.2, 5),
                "val_acc": np.linspace(0.3, 0.8, 5),
                "lr": 0.01,
            }
        ).to_csv(history, index=False)
    else:
        pd.DataFrame(columns=["epoch", "step", "train_loss"]).to_csv(history, index=False)
    plot_training_curves(history, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")


# ----- the stage, end to end on the digits with a real (scikit-learn) classifier -----


@pytest.fixture
def clean_stage(tmp_path):
    """A clean index over one shard array, as the clean stage writes them."""
    images, labels = digits_images()
    images, labels = images[:600, :, :, None], labels[:600]
    array = tmp_path / "images.npy"
    np.save(array, images)
    n = len(labels)
    index = pd.DataFrame(
        {
            "id": np.arange(n),
            "path": [f"/data/{label}/{i}.png" for i, label in enumerate(labels)],
            "relpath": [f"{label}/{i}.png" for i, label in enumerate(labels)],
            "label": labels.astype(str),
            "source": "train",
            "sha256": "x",
            "group": np.arange(n),
            "near_group": np.arange(n),
            "shard": 0,
            "row": np.arange(n),
            "array": str(array),
        }
    )
    index.to_csv(tmp_path / "index.csv", index=False)
    roles = assign_roles(index, 0.25, 0.15, seed=0)
    roles.to_csv(tmp_path / "split.csv", index=False)
    train = roles.loc[roles["role"] == "train", "id"].to_numpy()
    model = LogisticRegression(max_iter=300).fit(
        images[train].reshape(len(train), -1), labels[train]
    )
    lightning_metrics_csv(tmp_path / "history.csv")
    inputs = {name: str(tmp_path / f"{name}.csv") for name in ("index", "split", "history")}
    inputs["model"] = "unused.ckpt"
    return inputs, model, roles


def outputs_in(folder):
    names = {
        "metrics": "metrics.json",
        "confusion": "confusion.csv",
        "confusion_png": "confusion.png",
        "per_class": "per_class.csv",
        "curves": "curves.png",
        "predictions": "predictions.csv",
    }
    folder.mkdir()
    return {key: str(folder / name) for key, name in names.items()}


def test_stage_writes_consistent_outputs(tmp_path, clean_stage):
    inputs, model, roles = clean_stage
    seen = []

    def predict(checkpoint, images, ids):
        seen.append(checkpoint)
        batch = images[ids]
        return model.predict_proba(batch.reshape(len(batch), -1))

    out = outputs_in(tmp_path / "evaluate")
    metrics = run_evaluate(StageJob(input=inputs, output=out), predict=predict)
    assert seen == ["unused.ckpt"]
    test_ids = np.sort(roles.loc[roles["role"] == "test", "id"].to_numpy())
    predictions = pd.read_csv(out["predictions"], dtype={"label": str, "predicted": str})
    assert list(predictions.columns) == ["id", "path", "label", "predicted", "confidence"]
    assert predictions["id"].tolist() == test_ids.tolist()
    assert predictions["confidence"].between(0, 1).all()
    written = json.loads(open(out["metrics"]).read())
    assert written == metrics
    assert written["n_test"] == len(test_ids)
    assert written["accuracy"] == pytest.approx(
        (predictions["label"] == predictions["predicted"]).mean()
    )
    assert written["accuracy"] > 0.85  # a real classifier on the digits
    cm = pd.read_csv(out["confusion"], index_col=0)
    assert cm.to_numpy().sum() == len(test_ids)
    assert np.trace(cm.to_numpy()) == (predictions["label"] == predictions["predicted"]).sum()
    per_class = pd.read_csv(out["per_class"])
    assert per_class["support"].sum() == len(test_ids)
    assert_png(tmp_path / "evaluate" / "confusion.png")
    assert_png(tmp_path / "evaluate" / "curves.png")
    assert sorted(p.name for p in (tmp_path / "evaluate").iterdir()) == sorted(
        [
            "metrics.json",
            "confusion.csv",
            "confusion.png",
            "per_class.csv",
            "curves.png",
            "predictions.csv",
        ]
    )


def test_probabilities_of_the_wrong_shape_stop_the_stage(tmp_path):
    rows = pd.DataFrame({"id": [0, 1], "path": ["a", "b"], "label": ["cat", "dog"]})
    with pytest.raises(DataError, match="shape"):
        evaluate_predictions(rows, np.full((2, 3), 1 / 3), NAMES, outputs_in(tmp_path / "out"))


def test_no_test_image_stops_the_stage(tmp_path, clean_stage):
    inputs, model, roles = clean_stage
    roles.assign(role="train").to_csv(inputs["split"], index=False)
    with pytest.raises(DataError, match="no test image"):
        job = StageJob(input=inputs, output=outputs_in(tmp_path / "out"))
        run_evaluate(job, predict=lambda c, x, ids: None)


# ----- issue 23: the baselines beside the model, and the warning of a collapsed model -----


def test_baselines_are_fitted_on_the_training_role_and_scored_on_the_test_images(
    tmp_path, clean_stage
):
    from sklearn.dummy import DummyClassifier

    from imgpipe.learn.baselines import linear_pixels_baseline

    inputs, model, roles = clean_stage

    def predict(checkpoint, images, ids):
        batch = images[ids]
        return model.predict_proba(batch.reshape(len(batch), -1))

    metrics = run_evaluate(StageJob(input=inputs, output=outputs_in(tmp_path / "out")), predict)
    images, labels = digits_images()
    images, labels = images[:600, :, :, None], labels[:600]
    train = np.sort(roles.loc[roles["role"] == "train", "id"].to_numpy())
    test = np.sort(roles.loc[roles["role"] == "test", "id"].to_numpy())
    dummy = DummyClassifier(strategy="most_frequent").fit(train[:, None], labels[train])
    majority = metrics["baselines"]["majority"]
    assert majority["class"] == str(dummy.predict(test[:1, None])[0])
    assert majority["accuracy"] == pytest.approx(
        accuracy_score(labels[test], dummy.predict(test[:, None]))
    )
    assert (majority["n_train"], majority["n_test"]) == (len(train), len(test))
    direct = linear_pixels_baseline(images[train], labels[train], images[test], labels[test])
    assert metrics["baselines"]["linear_pixels"] == direct
    assert json.loads(open(tmp_path / "out" / "metrics.json").read())["baselines"] == {
        "majority": majority,
        "linear_pixels": direct,
    }


def test_baselines_of_a_swept_run_use_train_and_val_as_the_final_model_does(tmp_path, clean_stage):
    inputs, model, roles = clean_stage
    inputs = {**inputs, "best": str(tmp_path / "best.yaml")}

    def predict(checkpoint, images, ids):
        return model.predict_proba(images[ids].reshape(len(ids), -1))

    metrics = run_evaluate(StageJob(input=inputs, output=outputs_in(tmp_path / "out")), predict)
    pool = roles["role"].isin(["train", "val"]).sum()
    assert metrics["baselines"]["majority"]["n_train"] == pool


def test_a_collapsed_model_is_warned_about_in_the_log_and_on_the_terminal(
    tmp_path, clean_stage, capfd, monkeypatch
):
    from imgpipe.core.logs import PROGRESS_VAR, logged

    monkeypatch.setenv(PROGRESS_VAR, "1")
    inputs, _, _ = clean_stage
    # Few steps, an early stop while the learning rate still rose, a diverging validation loss.
    pd.DataFrame(
        {
            "epoch": range(4),
            "step": [9, 19, 29, 39],
            "train_loss": [2.3, 2.3, 2.3, 2.3],
            "val_loss": [1.0, 2.0, 3.0, 4.0],
            "lr": [0.001, 0.002, 0.003, 0.004],
        }
    ).to_csv(inputs["history"], index=False)
    summary = tmp_path / "train_summary.json"
    summary.write_text(json.dumps({"epochs": 4, "best_epoch": 0, "stopped_early": True}))
    inputs = {**inputs, "train_summary": str(summary)}

    def one_class(checkpoint, images, ids):  # the model predicts class 0 for every image
        probs = np.zeros((len(ids), 10))
        probs[:, 0] = 1.0
        return probs

    log_path = tmp_path / "logs" / "evaluate.log"
    with logged(log_path):
        job = StageJob(input=inputs, output=outputs_in(tmp_path / "out"), log=str(log_path))
        metrics = run_evaluate(job, predict=one_class)
    assert metrics["balanced_accuracy"] <= metrics["baselines"]["majority"]["balanced_accuracy"]
    warning = [line for line in log_path.read_text().splitlines() if " WARNING " in line]
    assert len(warning) == 1
    assert "WARNING WARNING" not in warning[0] and "WARNING:" not in warning[0]  # level said once
    assert "does not beat the baselines" in warning[0]
    assert "only 40 optimizer steps" in warning[0] and "still warming up" in warning[0]
    assert "validation loss diverging" in warning[0]
    terminal = capfd.readouterr().err
    assert "[evaluate] WARNING: the model does not beat the baselines" in terminal
