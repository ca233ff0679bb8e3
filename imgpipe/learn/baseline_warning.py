"""Whether a model beats its baselines, and what its own training files say about why not.

Reads scores and result tables only (no scikit-learn): the report, evaluate and
``imgpipe predict`` share the one warning line. The baselines themselves are
computed in :mod:`imgpipe.learn.baselines`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

SCORE_KEYS = ("accuracy", "balanced_accuracy", "f1_macro")
FEW_STEPS = 300  # fewer optimizer steps than this: "trained for only N steps"
DIVERGING = 3.0  # last validation loss / its minimum above this: diverging


def flat_baselines(baselines: Mapping[str, Any] | None) -> dict[str, float]:
    """``baseline_majority_accuracy``, ... ``baseline_linear_f1_macro``: the scores as flat columns."""
    flat: dict[str, float] = {}
    for name, short in (("majority", "majority"), ("linear_pixels", "linear")):
        scores = (baselines or {}).get(name) or {}
        for key in SCORE_KEYS:
            value = scores.get(key)
            flat[f"baseline_{short}_{key}"] = float(value) if value is not None else float("nan")
    return flat


# ----------------------------------------------------------------------------- the warning


def _score(scores: Mapping[str, Any] | None, key: str) -> float | None:
    value = (scores or {}).get(key)
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return None if value != value else value


def shortfalls(model: Mapping[str, Any], baselines: Mapping[str, Any] | None) -> list[str]:
    """How the model falls short of the baselines (empty when it beats both, or nothing to compare).

    Not above the majority class's balanced accuracy, or below the linear
    baseline's accuracy.
    """
    found = []
    baselines = baselines or {}
    mine, majority = (
        _score(model, "balanced_accuracy"),
        _score(baselines.get("majority"), "balanced_accuracy"),
    )
    if mine is not None and majority is not None and mine <= majority:
        found.append(
            f"balanced accuracy {mine:.3f} is not above the majority class's {majority:.3f}"
        )
    mine, linear = _score(model, "accuracy"), _score(baselines.get("linear_pixels"), "accuracy")
    if mine is not None and linear is not None and mine < linear:
        found.append(
            f"accuracy {mine:.3f} is below logistic regression on the pixels' {linear:.3f}"
        )
    return found


def optimizer_steps(history: pd.DataFrame | None) -> int | None:
    """Optimizer steps of a training run from its history.csv (the step count at the last epoch's end)."""
    if history is None or "step" not in history or history["step"].dropna().empty:
        return None
    return int(history["step"].max()) + 1


def likely_causes(history: pd.DataFrame | None, summary: Mapping[str, Any] | None) -> list[str]:
    """What the final model's own history.csv and summary.json show that explains a weak model.

    Few optimizer steps (< ``FEW_STEPS``), an early stop while the learning
    rate was still rising (the one-cycle warm-up), a validation loss that ends
    more than ``DIVERGING`` times its minimum; each only when the files show it.
    """
    causes = []
    steps = optimizer_steps(history)
    if steps is not None and steps < FEW_STEPS:
        epochs = int(history["epoch"].max()) + 1 if "epoch" in history else None
        causes.append(
            f"only {steps} optimizer steps"
            + (f" ({epochs} epochs of {max(1, steps // epochs)})" if epochs else "")
        )
    stopped = bool((summary or {}).get("stopped_early"))
    if stopped and history is not None and "lr" in history:
        lr = history["lr"].dropna()
        if len(lr) >= 2 and lr.iloc[-1] > lr.iloc[0] and lr.iloc[-1] >= lr.max():
            causes.append(
                f"stopped early after {len(history)} epochs, while the learning rate was "
                "still warming up"
            )
    if history is not None and "val_loss" in history:
        loss = history["val_loss"].dropna()
        if len(loss) >= 2 and loss.min() > 0 and loss.iloc[-1] / loss.min() > DIVERGING:
            causes.append(
                f"validation loss diverging (last {loss.iloc[-1]:.3g}, "
                f"{loss.iloc[-1] / loss.min():.1f}x its minimum {loss.min():.3g})"
            )
    return causes


def warning_line(
    model: Mapping[str, Any],
    baselines: Mapping[str, Any] | None,
    causes: Sequence[str] = (),
) -> str | None:
    """The one-line warning when the model does not beat the baselines, with its likely causes; else None."""
    found = shortfalls(model, baselines)
    if not found:
        return None
    text = "the model does not beat the baselines: " + "; ".join(found)
    if causes:
        text += " (likely causes: " + "; ".join(causes) + ")"
    return text
