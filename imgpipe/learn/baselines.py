"""Reference points for the model's scores: the majority class and a linear model on the pixels.

A test accuracy means little alone: on imbalanced classes always predicting
the most common class may score as much, and on easy images logistic
regression on the raw pixels may score more. Evaluate (on the test role) and
each cross-validation fold (on its held-out images) compute both on exactly
the images the model is trained and scored on; the report shows them beside
the model's numbers and warns when the model does not beat them.

- **majority**: always predict the most common *training* class (ties: the
  first in class order), scored with ``imgpipe.learn.metrics.headline_metrics`` (the
  macro averages over the classes that have test images, as for the model).
- **linear_pixels**: scikit-learn ``LogisticRegression`` (L2, C=1, lbfgs) on
  the ingested uint8 images box-filtered (``cv2.INTER_AREA``) to
  ``PIXEL_SIZE`` px (or the ingested size when smaller), grey or colour as
  ingested, flattened and standardised (``StandardScaler``), fitted on a
  stratified random sample of at most ``SAMPLE_MAX`` training images (seed
  ``SEED``) for at most ``MAX_ITER`` iterations: its time is bounded whatever
  the size of the training role (measured: README, "Baselines"). The result is
  deterministic for a given seed.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from imgpipe.learn.baseline_warning import SCORE_KEYS

log = logging.getLogger("imgpipe")

# Most training images the linear baseline is fitted on (a stratified sample above it).
SAMPLE_MAX = 5_000
# Side of the images the linear baseline sees (box-filtered; never upsampled).
PIXEL_SIZE = 16
# Iterations of lbfgs at most.
MAX_ITER = 200
# The fit's work bound: images x pixel values x classes x iterations. Each lbfgs
# iteration costs about images x pixel values x classes multiply-adds, so the
# iterations (and, with many classes, the sample) shrink to keep the time
# bounded: about 10 s on 2 shared cores (README, "Baselines").
WORK_MAX = 20e9
# Fewest iterations worth fitting; below it the sample shrinks instead.
MIN_ITER = 30
SEED = 0
# Bytes of uint8 images read at once to make features (1,024 at 48 px, 330 at 224 px RGB):
# memory stays bounded for any image size, training sample and test role.
CHUNK_BYTES = 48 * 2**20
# The headline keys each baseline reports (as the model's, from imgpipe.learn.metrics).
# The likely causes the warning names, with their thresholds.


class Images(Protocol):
    """uint8 NHWC images addressed by position: a numpy array or an ``ImageRows`` view."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, positions: np.ndarray) -> np.ndarray: ...


class ImageRows:
    """The images ``ids`` of a reader (``ShardImages``) as positions 0..len(ids)-1: only rows asked are read."""

    def __init__(self, images: Any, ids: np.ndarray):
        self.images, self.ids = images, np.asarray(ids, dtype=np.int64)
        self.shape = (len(self.ids), *images.shape[1:])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        return self.images[self.ids[np.asarray(positions, dtype=np.int64)]]


# ----------------------------------------------------------------------------- the baselines


def majority_baseline(
    y_train: np.ndarray, y_test: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Scores of always predicting the most common training class (codes into ``class_names``)."""
    from imgpipe.learn.metrics import headline_metrics

    y_train, y_test = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
    if len(y_train) == 0 or len(y_test) == 0:
        return {"skipped": "no training image" if len(y_train) == 0 else "no test image"}
    majority = int(np.bincount(y_train, minlength=len(class_names)).argmax())
    scores = headline_metrics(y_test, np.full(len(y_test), majority))
    return {
        "class": str(class_names[majority]),
        **{key: scores[key] for key in SCORE_KEYS},
        "n_train": len(y_train),
        "n_test": len(y_test),
    }


def stratified_sample(labels: np.ndarray, most: int, seed: int = SEED) -> np.ndarray:
    """Sorted positions of at most ``most`` labels, every class in proportion (at least one each).

    Each class gets ``floor(count x most / n)`` (at least 1), the places left
    go to the largest remainders; within a class the images are a seeded
    random draw. All positions when there are ``most`` or fewer.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n <= most:
        return np.arange(n)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    share = counts * most / n
    quota = np.minimum(np.maximum(np.floor(share).astype(np.int64), 1), counts)
    while quota.sum() > most:  # many one-image classes: take back from the largest
        quota[np.argmax(quota)] -= 1
    spare = most - int(quota.sum())
    for c in np.argsort(-(share - np.floor(share)), kind="stable"):
        if spare == 0:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
            spare -= 1
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    taken = [order[inverse[order] == c][: quota[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(taken))


def fit_plan(n: int, features: int, classes: int, sample_max: int) -> tuple[int, int] | None:
    """(training images, iterations) that keep the fit within ``WORK_MAX``; None when no useful plan does.

    ``sample_max`` images (or all ``n``) for up to ``MAX_ITER`` iterations;
    with many classes the iterations drop to ``MIN_ITER`` and then the sample
    shrinks, down to two images per class (fewer: None, the baseline is skipped).
    """
    images = min(n, sample_max)
    iterations = int(WORK_MAX // (images * features * classes))
    if iterations >= MIN_ITER:
        return images, min(iterations, MAX_ITER)
    images = int(WORK_MAX // (MIN_ITER * features * classes))
    return (images, MIN_ITER) if images >= 2 * classes else None


def chunks(images: Images, positions: np.ndarray) -> Iterator[np.ndarray]:
    """The images at ``positions``, read ``CHUNK_BYTES`` at a time, in order."""
    step = max(1, CHUNK_BYTES // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(positions), step):
        yield images[positions[start : start + step]]


def pixel_features(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images box-filtered to ``size`` px and flattened, as float32 in 0..1."""
    if images.shape[1] == size and images.shape[2] == size:
        small = images
    else:
        small = np.stack([cv2_resize(image, size) for image in images]).reshape(
            len(images), size, size, -1
        )
    return small.reshape(len(images), -1).astype(np.float32) / 255.0


def cv2_resize(image: np.ndarray, size: int) -> np.ndarray:
    """One HWC image to ``size`` x ``size`` with cv2's area filter (a box filter when shrinking)."""
    import cv2

    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def linear_pixels_baseline(
    x_train: Images,
    y_train: np.ndarray,
    x_test: Images,
    y_test: np.ndarray,
    class_names: Sequence[str] | None = None,
    sample_max: int = SAMPLE_MAX,
    size: int = PIXEL_SIZE,
    max_iter: int = MAX_ITER,
    seed: int = SEED,
) -> dict[str, Any]:
    """Logistic regression on the downsampled, standardised pixels of a training sample, scored on the test images.

    ``x_*`` are uint8 NHWC images (an array or an :class:`ImageRows` view:
    only the sampled training rows are read; the test images are read and
    predicted ``CHUNK_BYTES`` of images at a time). ``{"skipped": reason}`` when it cannot run.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from imgpipe.learn.metrics import headline_metrics

    y_train, y_test = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
    if len(y_train) == 0 or len(y_test) == 0:
        return {"skipped": "no training image" if len(y_train) == 0 else "no test image"}
    if len(np.unique(y_train)) < 2:
        return {"skipped": "the training images hold a single class: nothing to separate"}
    started = time.perf_counter()
    side = int(min(size, x_train.shape[1], x_train.shape[2]))
    n_classes = len(np.unique(y_train))
    plan = fit_plan(len(y_train), side * side * int(x_train.shape[3]), n_classes, sample_max)
    if plan is None:
        return {"skipped": f"{n_classes} classes are too many for the linear baseline's time bound"}
    sample_size, max_iter = plan[0], min(max_iter, plan[1])
    sample = stratified_sample(y_train, sample_size, seed)
    features = np.concatenate([pixel_features(part, side) for part in chunks(x_train, sample)])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    # One thread: as fast for a fit this size, never slowed by contention for
    # shared cores (two threads of spinning OpenMP ran 20x slower on a busy
    # 2-core machine), and the same sums in the same order on every machine.
    with threadpool_limits(1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(features, y_train[sample])
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    predicted = np.concatenate(
        [
            predict_one_thread(model, pixel_features(part, side))
            for part in chunks(x_test, np.arange(len(y_test)))
        ]
    )
    scores = headline_metrics(y_test, predicted)
    seconds = time.perf_counter() - started
    log.info(
        "linear baseline: %d of %d training images at %d px, %d iterations%s, %.1f s",
        len(sample),
        len(y_train),
        side,
        int(np.max(model[-1].n_iter_)),
        "" if converged else " (not converged)",
        seconds,
    )
    return {
        **{key: scores[key] for key in SCORE_KEYS},
        "n_train": len(y_train),
        "n_train_used": len(sample),
        "n_test": len(y_test),
        "size": side,
        "iterations": int(np.max(model[-1].n_iter_)),
        "max_iter": max_iter,
        "converged": converged,
        "seed": seed,
    }


def predict_one_thread(model: Any, features: np.ndarray) -> np.ndarray:
    """``model.predict(features)`` with one BLAS / OpenMP thread (see the fit)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return model.predict(features)


def both_baselines(
    images: Any,
    labels: np.ndarray,
    train_ids: np.ndarray,
    test_ids: np.ndarray,
    class_names: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """``{majority, linear_pixels}`` for the ids trained on and scored on (``images``: ShardImages)."""
    train_ids, test_ids = np.asarray(train_ids, np.int64), np.asarray(test_ids, np.int64)
    return {
        "majority": majority_baseline(labels[train_ids], labels[test_ids], class_names),
        "linear_pixels": linear_pixels_baseline(
            ImageRows(images, train_ids),
            labels[train_ids],
            ImageRows(images, test_ids),
            labels[test_ids],
            class_names,
        ),
    }


# ----------------------------------------------------------------------------- predict


def labelled_input_baselines(
    y_true: np.ndarray, class_names: Sequence[str], metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """The baselines ``imgpipe predict`` can score on a labelled input (codes into ``class_names``).

    The majority class is the model's most common *training* class when the
    model file stores ``train_class_counts`` (files of this version), else the
    labelled input's own most common class (said in ``majority.from``). The
    linear baseline needs the training pixels: not available here; the model
    file's own test metrics are given for comparison when it carries them.
    """
    from imgpipe.learn.metrics import headline_metrics

    y_true = np.asarray(y_true, np.int64)
    if len(y_true) == 0:
        return {"majority": {"skipped": "no labelled image of a class of the model"}}
    counts = metadata.get("train_class_counts")
    if isinstance(counts, Mapping) and any(counts.values()):
        majority = int(np.argmax([int(counts.get(name, 0)) for name in class_names]))
        source = "the model's training images"
    else:
        majority = int(np.bincount(y_true, minlength=len(class_names)).argmax())
        source = "this labelled input (the model file stores no training class counts)"
    scores = headline_metrics(y_true, np.full(len(y_true), majority))
    result: dict[str, Any] = {
        "majority": {
            "class": str(class_names[majority]),
            "from": source,
            **{key: scores[key] for key in SCORE_KEYS},
        },
        "linear_pixels": {
            "skipped": "needs the training images: see the training run's report",
        },
    }
    if metadata.get("test_metrics"):
        result["model_test_metrics"] = dict(metadata["test_metrics"])
    return result
