"""What every training job (sweep trial, k-fold fold, final model) shares: its data and its run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from imgpipe.atomic import write_csv, write_json  # noqa: F401 (re-exported for scripts)
from imgpipe.dataset import label_codes, load_images, load_index

RESUME_ROOT = Path(".imgpipe") / "resume"


@dataclass
class TrainingData:
    """The cleaned images (in index order, so ``id == row``), labels, roles and augmented views."""

    index: pd.DataFrame
    images: np.ndarray
    labels: np.ndarray
    roles: pd.Series
    aug_images: np.ndarray
    aug_sources: np.ndarray

    def ids(self, *roles: str) -> np.ndarray:
        """Sorted ids of the images whose split role is one of ``roles``."""
        return np.sort(self.roles.index[self.roles.isin(roles)].to_numpy())


def load_training_data(
    index_path: str, split_path: str, aug_images_path: str, aug_index_path: str
) -> TrainingData:
    """Load the cleaned array, the split and the augmented views into memory, once."""
    index = load_index(index_path)
    split = pd.read_csv(split_path)
    aug_index = pd.read_csv(aug_index_path)
    return TrainingData(
        index=index,
        images=load_images(index),
        labels=label_codes(index),
        roles=split.set_index("id")["role"],
        aug_images=np.load(aug_images_path, allow_pickle=False),
        aug_sources=aug_index["source_id"].to_numpy(dtype=np.int64),
    )


def read_best(path: str | None) -> dict[str, Any]:
    """The sweep winner's overrides and epoch count from best.yaml (empty when no sweep)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def job_key(*parts: Any) -> str:
    """A stable hash of a job's identity (its config and the stat of its inputs)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def input_stamp(paths: Mapping[str, str] | list[str]) -> list:
    """(path, size, mtime) of each input: changes whenever Snakemake would rerun for them."""
    values = paths.values() if isinstance(paths, Mapping) else paths
    stamps = []
    for path in values:
        stat = os.stat(path)
        stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
    return stamps


def resume_dir_for(key: str) -> Path:
    """Where a job keeps the state it resumes from after a kill (outside Snakemake's outputs)."""
    return RESUME_ROOT / key


def job_devices(gpu_resource: int, train_cfg: Mapping) -> tuple[int, bool]:
    """(devices, on_gpu) for a job: its ``gpu`` resource, or ``train.cpu_devices`` without GPUs."""
    if gpu_resource and gpu_resource > 0:
        return int(gpu_resource), True
    return int(train_cfg.get("cpu_devices", 1)), False


def run_training(
    data: TrainingData,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    model_cfg: Mapping,
    train_cfg: Mapping,
    out_dir: str | os.PathLike,
    gpu_resource: int,
    key: str,
) -> dict:
    """Train one model on ``train_ids`` (validating on ``val_ids``) with resume and GPU claiming.

    The resume state lives under ``.imgpipe/resume/<key>``, ``key`` naming the
    job's config and inputs, so a rerun after a kill continues from the last
    checkpoint while a changed job never resumes a stale one.
    """
    from imgpipe.gpus import claim_devices
    from imgpipe.training import fit

    devices, on_gpu = job_devices(gpu_resource, train_cfg)
    claim = claim_devices(devices) if on_gpu else contextlib.nullcontext()
    with claim:
        return fit(
            data.images,
            data.labels,
            train_ids,
            val_ids,
            data.aug_images,
            data.aug_sources,
            model_cfg,
            train_cfg,
            out_dir,
            devices=devices,
            resume_dir=resume_dir_for(key),
        )
