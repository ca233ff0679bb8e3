"""Hyperparameter sweep: the trial table (grid or seeded random) and the choice of the best trial."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.core.atomic import plain
from imgpipe.learn.monitor import metric_mode

log = logging.getLogger("imgpipe")

# Keys sampled log-uniformly by ``method: random`` (scale parameters spanning decades).
LOG_SCALE_KEYS = {"train.lr", "train.weight_decay", "train.l1"}


def column_names(keys: list[str]) -> dict[str, str]:
    """Map dotted config keys (``train.lr``) to readable wildcard-safe column names (``lr``).

    The section prefix is dropped unless two sections share a key name.
    """
    short = [key.split(".", 1)[1] for key in keys]
    return {
        key: name if short.count(name) == 1 else key.replace(".", "_")
        for key, name in zip(keys, short, strict=True)
    }


def grid_trials(grid: Mapping[str, list]) -> pd.DataFrame:
    """Every combination of the grid's values, one row per trial, columns named by column_names."""
    keys = list(grid)
    rows = list(itertools.product(*(grid[key] for key in keys)))
    names = column_names(keys)
    return pd.DataFrame(rows, columns=[names[key] for key in keys])


def _sample(rng: np.random.Generator, key: str, bounds: list) -> Any:
    numeric = len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)
    if not numeric or any(isinstance(b, bool) for b in bounds):
        return bounds[rng.integers(len(bounds))]
    low, high = bounds
    if isinstance(low, int) and isinstance(high, int):
        return int(rng.integers(low, high + 1))
    if key in LOG_SCALE_KEYS and low > 0:
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return float(f"{value:.3g}")  # readable trial paths; 3 significant digits is plenty


def random_trials(ranges: Mapping[str, list], n_trials: int, seed: int) -> pd.DataFrame:
    """``n_trials`` seeded samples from ``ranges``; trial i is the same whatever ``n_trials`` is.

    A two-number range is continuous (log-uniform for learning rate, weight
    decay and L1; integers stay integers); any other list is a set of choices.
    """
    keys = list(ranges)
    rows = []
    for trial in range(n_trials):
        rng = np.random.default_rng([seed, trial])
        rows.append([_sample(rng, key, list(ranges[key])) for key in keys])
    names = column_names(keys)
    return pd.DataFrame(rows, columns=[names[key] for key in keys]).drop_duplicates()


def trial_table(sweep_cfg: Mapping) -> pd.DataFrame:
    """The sweep's trials as a DataFrame (one row per trial) from the ``sweep`` config section."""
    if sweep_cfg["method"] == "grid":
        table = grid_trials(sweep_cfg["grid"])
    else:
        table = random_trials(sweep_cfg["ranges"], sweep_cfg["n_trials"], sweep_cfg["seed"])
    if table.empty or table.shape[1] == 0:
        raise ValueError(f"sweep.{sweep_cfg['method']}: the sweep defines no trial")
    return table.reset_index(drop=True)


def dotted_keys(sweep_cfg: Mapping) -> dict[str, str]:
    """Map each trial-table column back to its dotted config key."""
    keys = list(sweep_cfg["grid"] if sweep_cfg["method"] == "grid" else sweep_cfg["ranges"])
    return {name: key for key, name in column_names(keys).items()}


def overrides(instance: Mapping[str, Any], sweep_cfg: Mapping) -> dict[str, Any]:
    """Turn one trial (column -> value) into config overrides (dotted key -> plain Python value)."""
    keys = dotted_keys(sweep_cfg)
    return {keys[name]: plain(value) for name, value in instance.items()}


def apply_overrides(sections: Mapping[str, Mapping], changes: Mapping[str, Any]) -> dict:
    """Return a deep copy of the config sections with ``{"train.lr": 0.01}``-style changes applied."""
    merged = {name: dict(values) for name, values in sections.items()}
    for key, value in changes.items():
        section, name = key.split(".", 1)
        if section not in merged:
            raise KeyError(f"{key}: the sweep can only set keys of {sorted(merged)}")
        merged[section][name] = value
    return merged


def tie_breaker(monitor: str) -> str:
    """The metric that breaks a tie on ``monitor``: validation loss for accuracy, and the reverse.

    Accuracy on a few hundred validation images moves in coarse steps (1/216 on
    the demo), so ties are common; the loss is continuous and says which of
    the tied models is the more confident where it is right.
    """
    return "val_loss" if metric_mode(monitor) == "max" else "val_acc"


def rank_trials(trials: pd.DataFrame, monitor: str) -> pd.DataFrame:
    """Trials best first: on ``monitor``, then on ``tie_breaker(monitor)``, then in sweep order.

    Sweep order is the order of the rows given (the grid's or the random
    draws', as sweep_aggregate reads them), so the ranking is deterministic.
    A missing tie-breaker value ranks last among its ties.
    """
    second = tie_breaker(monitor)
    keys, ascending = [monitor], [metric_mode(monitor) == "min"]
    if second in trials.columns:
        keys.append(second)
        ascending.append(metric_mode(second) == "min")
    ordered = trials.sort_values(keys, ascending=ascending, kind="stable", na_position="last")
    return ordered.reset_index(drop=True)


def best_trial(trials: pd.DataFrame, metric: str) -> pd.Series:
    """The first trial of ``rank_trials``: best score, then best tie-breaker, then the earlier trial."""
    return rank_trials(trials, metric).iloc[0]


def collect_trials(summaries: list[Mapping], monitor: str) -> pd.DataFrame:
    """One row per trial, best first: its swept values (dotted keys), its score, epochs, steps, seconds.

    A trial's score is its LAST epoch's validation metric (the end of its
    schedule, the model the final recipe reproduces), not its best epoch's;
    the tie-breaking metric is its last epoch's too. ``summaries`` come in
    sweep order.
    """
    second = tie_breaker(monitor)
    rows = []
    for summary in summaries:
        row = {"trial": summary["trial"], **summary["overrides"]}
        row[monitor] = summary["score"]
        row[second] = summary.get(f"last_{second}", float("nan"))
        row["epochs"] = summary["epochs"]
        row["steps"] = summary.get("steps")
        row["seconds"] = summary["seconds"]
        # Fitted on the trial's validation images: the final model after the sweep takes it.
        row["temperature"] = summary.get("temperature", 1.0)
        rows.append(row)
    return rank_trials(pd.DataFrame(rows), monitor)


def best_config(trials: pd.DataFrame, monitor: str) -> dict[str, Any]:
    """best.yaml's content: the winning trial's overrides, its score and the epochs of its schedule."""
    best = best_trial(trials, monitor)
    swept = [c for c in trials.columns if "." in c]
    return {
        "trial": str(best["trial"]),
        "overrides": {key: plain(best[key]) for key in swept},
        "metric": monitor,
        "score": float(best[monitor]),
        "rule": "last epoch",
        # The whole schedule the trial ran and was scored at the end of: the
        # final model and the CV folds run the same schedule (imgpipe.learn.schedule).
        "epochs": int(best["epochs"]),
        # The winner's calibration temperature, fitted on its validation images
        # (imgpipe.learn.calibration): the final model and the folds, which train
        # without validation images, take it.
        "temperature": float(best.get("temperature", 1.0)),
    }


def plot_trials(trials: pd.DataFrame, monitor: str, path: str) -> None:
    """Bar chart of the monitored metric per trial, best first."""
    from imgpipe.core.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(trials) + 2), 3.2))
    ax.bar(range(len(trials)), trials[monitor], color="#4c72b0")
    ax.set_xticks(range(len(trials)))
    ax.set_xticklabels(trials["trial"], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(monitor)
    low = trials[monitor].min()
    if metric_mode(monitor) == "max":  # an accuracy: at most 1
        ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_title("sweep: validation metric per trial (last epoch)")
    save_figure(fig, path)
