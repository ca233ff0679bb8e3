"""The run ledger, results/runs.csv: one row per finished run (id, time, fingerprints, headline numbers).

The report stage appends this run's row (:func:`record_run`), once per run even
when the stage is retried, and the page shows the runs side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from imgpipe.core.atomic import plain, write_csv
from imgpipe.core.atomic import read_csv as read_table_file
from imgpipe.report.summary import flatten, input_files, read_csv, read_yaml

log = logging.getLogger("imgpipe")

RUN_COLUMNS = (
    "run_id",
    "finished",
    "config_hash",
    "data_fingerprint",
    "code_version",
    "images",
    "test_accuracy",
    "test_balanced_accuracy",
    "test_f1_macro",
    "baseline_majority_accuracy",
    "baseline_majority_balanced_accuracy",
    "baseline_linear_accuracy",
    "baseline_linear_balanced_accuracy",
    "warning",
    "cv_accuracy_mean",
    "cv_accuracy_std",
    "best_trial",
    "best_trial_metric",
    "best_trial_score",
    "changes",
    "config",
)


def config_hash(inputs: Mapping[str, Any]) -> str | None:
    """12 hex digits of the effective configuration's content (comments and key order ignored)."""
    config = read_yaml(inputs, "config")
    if config is None:
        return None
    text = json.dumps(plain(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def data_fingerprint(inputs: Mapping[str, Any]) -> str | None:
    """12 hex digits of the clean data: every kept image's content hash and label, in any order."""
    index = read_csv(inputs, "clean_index")
    if index is None or not {"sha256", "label"} <= set(index.columns):
        return None
    rows = sorted(f"{sha}\t{lab}" for sha, lab in zip(index["sha256"], index["label"], strict=True))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:12]


def code_version(folder: str | os.PathLike | None = None) -> str:
    """``imgpipe.__version__``, plus the git commit (``+dirty`` with local edits) of a git checkout."""
    from imgpipe import __version__

    folder = Path(folder) if folder is not None else Path(__file__).resolve().parents[2]
    version = __version__
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if commit.returncode == 0 and commit.stdout.strip():
            version += f" {commit.stdout.strip()}"
            status = subprocess.run(
                ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no", "."],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if status.returncode == 0 and status.stdout.strip():
                version += "+dirty"
    except (OSError, subprocess.SubprocessError):  # no git: the version alone
        pass
    return version


def run_id(inputs: Mapping[str, Any]) -> str:
    """12 hex digits naming this run: the configuration and the content of every report input.

    A retried or forced report over the same results gets the same id (and
    adds no row); any rerun upstream that changed a result gets a new one.
    """
    digest = hashlib.sha256((config_hash(inputs) or "").encode())
    for name, path in input_files(inputs):
        digest.update(f"\n{name}\t{Path(path).name}\t".encode())
        if Path(path).is_file():
            with open(path, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def flat_config(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The effective configuration as {dotted key: value}."""
    return {k: plain(v) for k, v in flatten(read_yaml(inputs, "config") or {}).items()}


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any], most: int = 6) -> str:
    """The config keys that differ, as ``train.lr 0.01 -> 0.02; ...`` (at most ``most``, then a count)."""
    keys = sorted(set(before) | set(after))
    missing = "(unset)"
    changed = [
        f"{key} {_short(before.get(key, missing))} → {_short(after.get(key, missing))}"
        for key in keys
        if before.get(key, missing) != after.get(key, missing)
    ]
    if not changed:
        return "no config change"
    shown = "; ".join(changed[:most])
    return shown + (f"; and {len(changed) - most} more" if len(changed) > most else "")


def _short(value: Any) -> str:
    text = (
        json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else value
    )
    return text if len(text) <= 40 else text[:37] + "..."


def read_runs(path: str | os.PathLike) -> pd.DataFrame:
    """The run log (results/runs.csv), empty with its columns when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    return read_table_file(path, dtype={"run_id": str, "config_hash": str, "data_fingerprint": str})


def run_row(
    inputs: Mapping[str, Any],
    numbers: Mapping[str, Any],
    previous: Mapping | None,
    this_run: str | None = None,
) -> dict:
    """This run's row of runs.csv: id, time, config hash, data fingerprint, code, headline numbers.

    ``changes`` lists the config keys that differ from the ``previous`` row's.
    """
    test, cv = numbers.get("test") or {}, numbers.get("cv") or {}
    sweep, images = numbers.get("sweep") or {}, numbers.get("images") or {}
    baselines = test.get("baselines") or {}
    config = flat_config(inputs)
    before = None
    if previous is not None and isinstance(previous.get("config"), str):
        try:
            before = json.loads(previous["config"])
        except json.JSONDecodeError:
            before = None
    return {
        "run_id": this_run or run_id(inputs),
        "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
        "config_hash": config_hash(inputs),
        "data_fingerprint": data_fingerprint(inputs),
        "code_version": code_version(),
        "images": images.get("kept"),
        "test_accuracy": test.get("accuracy"),
        "test_balanced_accuracy": test.get("balanced_accuracy"),
        "test_f1_macro": test.get("f1_macro"),
        **{key: baselines.get(key) for key in RUN_COLUMNS if key.startswith("baseline_")},
        "warning": test.get("warning") or "",
        "cv_accuracy_mean": cv.get("accuracy_mean"),
        "cv_accuracy_std": cv.get("accuracy_std"),
        "best_trial": sweep.get("best_trial"),
        "best_trial_metric": sweep.get("metric"),
        "best_trial_score": sweep.get("best_value"),
        "changes": "first run" if before is None else config_changes(before, config),
        "config": json.dumps(config, sort_keys=True, ensure_ascii=False, default=str),
    }


def record_run(
    inputs: Mapping[str, Any], numbers: Mapping[str, Any], path: str | os.PathLike
) -> tuple[pd.DataFrame, str]:
    """Append this run's row to the run log ``path`` unless its last row is this run; return (log, id).

    The log is not a Snakemake output (Snakemake would delete it before every
    report job): it is read, extended and written back atomically. The id
    (:func:`run_id`) is the same when the report job is retried or forced
    over unchanged results, so a run is logged once.
    """
    runs = read_runs(path)
    this = run_id(inputs)
    if len(runs) and str(runs["run_id"].iloc[-1]) == this:
        log.info("run %s is already the last row of %s", this, path)
        return runs, this
    previous = runs.iloc[-1].to_dict() if len(runs) else None
    row = run_row(inputs, numbers, previous, this)
    runs = (
        pd.concat([runs, pd.DataFrame([row])], ignore_index=True)
        if len(runs)
        else pd.DataFrame([row])
    )
    columns = [c for c in RUN_COLUMNS if c in runs] + [c for c in runs if c not in RUN_COLUMNS]
    write_csv(runs[columns], path)
    log.info("run %s appended to %s (%d runs)", this, path, len(runs))
    return runs[columns], this
