"""Classification metrics over what was tested: the one home of accuracy, balanced accuracy and macro scores.

Used by evaluate (the test set), the k-fold jobs (each fold's held-out
images), the final model's file (its test metrics) and prediction of a labelled
folder: the same definitions everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def per_class_table(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """Precision, recall, F1 and support per class; labels are codes into ``class_names``."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(class_names)), zero_division=0
    )
    return pd.DataFrame(
        {
            "class": list(class_names),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support.astype(np.int64),
        }
    )


def headline_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro precision / recall / F1 over the classes that were tested.

    A class without a single true image in ``y_true`` has no recall, and
    counting it as 0 would lower every macro average without anything having
    been tested: the macro averages (and balanced accuracy, the macro recall)
    run over the classes present in ``y_true``. A tested image predicted as an
    untested class still lowers the recall of its own class.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return {key: float("nan") for key in HEADLINE_KEYS}
    tested = np.unique(y_true)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=tested, average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(recall),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
    }


HEADLINE_KEYS = ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro")


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> dict:
    """Headline metrics over the tested classes, the untested classes, and the per-class table.

    ``classes_without_test_images`` lists the classes of ``class_names`` with no
    image in ``y_true``: they are left out of every macro average (see
    ``headline_metrics``) and shown apart.
    """
    table = per_class_table(y_true, y_pred, class_names)
    untested = [name for name, n in zip(class_names, table["support"], strict=True) if n == 0]
    return {
        "n": int(len(y_true)),
        **headline_metrics(y_true, y_pred),
        "classes_tested": len(class_names) - len(untested),
        "classes_without_test_images": untested,
        "per_class": {
            row["class"]: {key: row[key] for key in ("precision", "recall", "f1", "support")}
            for row in table.astype({"support": int}).to_dict("records")
        },
    }


# The test metrics a model file carries (imgpipe.learn.jobs.record_test_metrics), besides n_test.
MODEL_FILE_TEST_KEYS = ("accuracy", "balanced_accuracy", "f1_macro")


def test_set_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """The test set's scores: metrics.json's (evaluate) and, in part, the model file's stamp.

    ``n_test``, the headline metrics over the tested classes, the untested
    classes, the per-class table and the class names, in that order; the
    final model's file keeps ``n_test`` and ``MODEL_FILE_TEST_KEYS`` of them.
    """
    metrics = classification_metrics(y_true, y_pred, class_names)
    return {"n_test": metrics.pop("n"), **metrics, "classes": list(class_names)}


def confusion_matrix_table(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """Counts with true classes as rows and predicted classes as columns, both labelled."""
    counts = confusion_matrix(y_true, y_pred, labels=np.arange(len(class_names)))
    return pd.DataFrame(
        counts,
        index=pd.Index(list(class_names), name="true"),
        columns=pd.Index(list(class_names), name="predicted"),
    )
