"""The validation metrics a run is judged on, and which way is better: the one home of a metric's direction.

Training (the best epoch, early stopping), the sweep (ranking trials, the
tie-breaker) and the report (the order it names) all ask ``metric_mode``.
Kept free of third-party imports: the report's environment imports it too.
"""

from __future__ import annotations

from typing import Literal


def metric_mode(name: str) -> Literal["min", "max"]:
    """``"max"`` for a metric where higher is better (accuracy), ``"min"`` for one where lower is (loss)."""
    # train.monitor is val_acc or val_loss (config/schema.yaml); the sweep's tie-breaker the other.
    if name.endswith("acc"):
        return "max"
    if name.endswith("loss"):
        return "min"
    raise ValueError(f"{name!r}: not a monitored metric (an accuracy or a loss)")
