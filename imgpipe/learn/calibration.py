"""Calibrated probabilities: one temperature T per model, ``softmax(logits / T)``.

Temperature scaling (Guo et al., 2017) divides every logit of a trained model
by one positive scalar fitted on images the model never trained on: the
argmax, hence every prediction and accuracy, is unchanged; only how sure the
probabilities are moves. ``apply_temperature`` is the one place it is applied
(evaluate, ``imgpipe predict``, k-fold out-of-fold probabilities, the exported
graphs).

``fit_temperature`` minimises the negative log-likelihood over log T with a
bounded 1-D search (scipy's bounded Brent method, ``minimize_scalar``) within
[``T_MIN``, ``T_MAX``]: deterministic, no learning rate to tune, and bounded,
so that a validation set the model gets all right (NLL falls without end as T
goes to 0) ends at ``T_MIN`` rather than at an infinitely sure model.

Pure functions on numpy arrays (torch tensors work for ``apply_temperature``):
the report imports this module without torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from imgpipe.core.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

# Expected calibration error's equal-width confidence bins.
ECE_BINS = 15
# The bounds of the search: a model is at most 20x too sure or 20x too unsure.
T_MIN, T_MAX = 0.05, 20.0
# Search tolerance on log T (a relative change of 1e-6 in T).
LOG_T_TOLERANCE = 1e-6


def checked_temperature(value: Any, what: str = "temperature") -> float:
    """``value`` as a float if it is a finite number > 0, else a one-line DataError."""
    ok = (
        isinstance(value, int | float | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise DataError(f"{what} is {shown}, expected a finite number > 0")
    return float(value)


def apply_temperature(logits: Any, temperature: float) -> Any:
    """``logits / T``: the calibrated logits (numpy array or torch tensor, same type back)."""
    return logits / checked_temperature(temperature)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: the row maximum is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / T)`` of a (N, classes) array, float64."""
    return softmax(apply_temperature(np.asarray(logits, dtype=np.float64), temperature))


def _checked(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.shape != (len(z),):
        raise DataError(f"logits {z.shape} and labels {y.shape}: expected (N, classes) and (N,)")
    if not np.isfinite(z).all():
        raise DataError("the logits hold non-finite values: cannot calibrate them")
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise DataError(f"labels outside 0..{z.shape[1] - 1}")
    return z, y.astype(np.int64)


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)`` (nan for no rows)."""
    z, y = _checked(logits, labels)
    if len(y) == 0:
        return float("nan")
    z = apply_temperature(z, temperature)
    m = z.max(axis=1)
    log_norm = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def fit_temperature(logits: Any, labels: Any) -> float:
    """The T in [T_MIN, T_MAX] minimising ``nll(logits, labels, T)``: a bounded search on log T.

    Deterministic (scipy's bounded Brent method); one row or more required.
    """
    from scipy.optimize import minimize_scalar

    z, y = _checked(logits, labels)
    if len(y) == 0:
        raise DataError("no images to fit a temperature on")
    found = minimize_scalar(
        lambda log_t: nll(z, y, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": LOG_T_TOLERANCE},
    )
    # Brent's bounded search never evaluates the bounds themselves: keep T = 1 when it is as good.
    best = math.exp(float(found.x))
    return 1.0 if nll(z, y, 1.0) <= nll(z, y, best) else best


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins of (0, 1]: bin b holds confidences in (b / bins, (b + 1) / bins]."""
    return np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)


def reliability_table(probs: Any, labels: Any, bins: int = ECE_BINS) -> pd.DataFrame:
    """One row per confidence bin: ``bin, count, confidence`` (mean), ``accuracy`` (nan when empty)."""
    import pandas as pd

    p, y = _checked(probs, labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    which = _bin_of(confidence, bins)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
    return pd.DataFrame(
        {"bin": np.arange(bins), "count": count, "confidence": mean_conf, "accuracy": accuracy}
    )


def expected_calibration_error(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    table = reliability_table(probs, labels, bins)
    filled = table[table["count"] > 0]
    if filled.empty:
        return float("nan")
    gap = (filled["accuracy"] - filled["confidence"]).abs()
    return float((gap * filled["count"]).sum() / filled["count"].sum())


def calibration_summary(
    logits: Any, labels: Any, temperature: float, fitted_on: str, bins: int = ECE_BINS
) -> dict[str, Any]:
    """ECE and NLL of ``logits`` before (T = 1) and after ``temperature``, with both reliability tables.

    What evaluate writes to metrics.json (``calibration``) for the test images.
    """
    temperature = checked_temperature(temperature)
    before, after = (
        calibrated_probabilities(logits, 1.0),
        calibrated_probabilities(logits, temperature),
    )

    def rows(probs: np.ndarray) -> list[dict[str, Any]]:
        table = reliability_table(probs, labels, bins)
        table = table.astype(object).where(table.notna(), None)
        return table.to_dict(orient="records")

    return {
        "temperature": temperature,
        "fitted_on": fitted_on,
        "n": int(len(np.asarray(labels))),
        "ece_before": expected_calibration_error(before, labels, bins),
        "ece_after": expected_calibration_error(after, labels, bins),
        "nll_before": nll(logits, labels, 1.0),
        "nll_after": nll(logits, labels, temperature),
        "bins": bins,
        "reliability": {"before": rows(before), "after": rows(after)},
    }
