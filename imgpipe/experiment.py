"""A training job as one unit: one function per job kind (sweep trial, k-fold fold, final model).

Each works out, in one place, what the three training rules share: the
model / train sections with the sweep's overrides applied, the job's threads
and devices, which roles it trains and validates on, the key of its resume
state, and whether it trains here or starts srun ranks (imgpipe.launch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from imgpipe.atomic import write_csv, write_json
from imgpipe.dataset import NpyRows, ShardImages, label_codes, load_index, open_images
from imgpipe.split import load_split, role_ids
from imgpipe.stage import StageJob
from imgpipe.sweep import apply_overrides

log = logging.getLogger("imgpipe")

RESUME_ROOT = Path(".imgpipe") / "resume"
# The inputs every training job reads (the shard arrays come with the index's ``array`` column).
DATA_INPUTS = ("index", "split", "aug_images", "aug_index")


# ----------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """The clean index's images (read from the shards on demand), labels, roles and augmented views."""

    index: pd.DataFrame
    images: ShardImages
    labels: np.ndarray
    roles: pd.Series
    aug_images: NpyRows | None
    aug_sources: np.ndarray

    def ids(self, *roles: str) -> np.ndarray:
        """Sorted ids of the images whose split role is one of ``roles``."""
        return role_ids(self.roles, *roles)


def load_training_data(inputs: Mapping[str, str]) -> TrainingData:
    """Open the training data named by ``inputs`` (index, split, aug_images, aug_index): nothing is read yet."""
    index = load_index(inputs["index"])
    aug_index = pd.read_csv(inputs["aug_index"])
    aug_images = NpyRows(inputs["aug_images"]) if len(aug_index) else None
    return TrainingData(
        index=index,
        images=open_images(index),
        labels=label_codes(index),
        roles=load_split(inputs["split"]),
        aug_images=aug_images,
        aug_sources=aug_index["source_id"].to_numpy(dtype=np.int64),
    )


# ----------------------------------------------------------------------------- settings


def read_best(path: str | None) -> dict[str, Any]:
    """The sweep winner's overrides and epoch count from best.yaml (empty when no sweep)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def job_sections(
    params: Mapping[str, Any], threads: int, overrides: Mapping[str, Any] | None = None
) -> tuple[dict, dict]:
    """(model, train) sections of a job: the rule's params with ``overrides`` applied, threads filled in."""
    sections = apply_overrides(
        {"model": params["model"], "train": params["train"]}, dict(overrides or {})
    )
    model_cfg, train_cfg = sections["model"], sections["train"]
    train_cfg["threads"] = train_cfg.get("threads") or threads
    return model_cfg, train_cfg


def job_key(*parts: Any) -> str:
    """A stable hash of a job's identity (its config and the stat of its inputs)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def input_stamp(paths: Mapping[str, Any] | list) -> list:
    """(path, size, mtime) of each input file: changes whenever Snakemake would rerun for them."""
    values = paths.values() if isinstance(paths, Mapping) else paths
    flat: list[str] = []
    for value in values:
        flat.extend([value] if isinstance(value, str | os.PathLike) else list(value))
    stamps = []
    for path in flat:
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


# ----------------------------------------------------------------------------- training


def run_training(
    data: TrainingData,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    model_cfg: Mapping,
    train_cfg: Mapping,
    out_dir: str | os.PathLike,
    gpu_resource: int,
    key: str,
    augment_cfg: Mapping | None = None,
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
            augment_cfg=augment_cfg,
        )


def data_inputs(inputs: Mapping[str, Any]) -> dict[str, str]:
    """The inputs that name a job's training data."""
    return {name: inputs[name] for name in DATA_INPUTS}


# ----------------------------------------------------------------------------- job kinds


def run_sweep_trial(job: StageJob) -> dict:
    """One sweep trial: its overrides, trained on the train role, best epoch picked on val."""
    overrides = job.params["overrides"]
    model_cfg, train_cfg = job_sections(job.params, job.threads, overrides)
    trial = job.wildcards["trial"]
    log.info("trial %s: %s", trial, overrides)
    data = load_training_data(job.input)
    out_dir = Path(job.output["summary"]).parent
    sections = {"model": model_cfg, "train": train_cfg}
    key = job_key("sweep", sections, input_stamp(job.input), str(out_dir))
    result = run_training(
        data,
        data.ids("train"),
        data.ids("val"),
        model_cfg,
        train_cfg,
        out_dir,
        job.resources.get("gpu", 0),
        key,
        job.params.get("augment"),
    )
    summary = {**result, "trial": trial, "overrides": overrides}
    write_json(summary, job.output["summary"])
    return summary


def run_cv_fold(job: StageJob) -> dict:
    """Train on every fold but this one, predict this one: write its out-of-fold probabilities.

    A fold at or beyond the number of folds actually used (``cv.adapt_k``
    lowered k) writes an empty table and a summary marked ``skipped``; the
    fold's model and history (written beside them) are not declared outputs
    for that reason.
    """
    from imgpipe.cv import fold_metrics
    from imgpipe.predict import predict_proba

    fold = int(job.wildcards["fold"])
    oof_path, summary_path = job.output["oof"], job.output["summary"]
    folds = pd.read_csv(job.input["folds"])
    if fold >= folds["fold"].nunique():
        log.info("fold %d skipped: only %d folds are used", fold, folds["fold"].nunique())
        write_csv(pd.DataFrame(columns=["id", "fold", "label"]), oof_path)
        write_json({"fold": fold, "skipped": True}, summary_path)
        return {"skipped": True}
    best = read_best(job.input.get("best"))
    train_cfg = dict(job.params["train"])
    train_cfg["threads"] = train_cfg["threads"] or job.threads
    key = job_key("cv", fold, job.params["model"], train_cfg, best, input_stamp(job.input))
    model_cfg, train_cfg = job_sections(job.params, job.threads, best.get("overrides", {}))
    data = load_training_data(job.input)
    held_out = np.sort(folds.loc[folds["fold"] == fold, "id"].to_numpy())
    train_ids = np.sort(folds.loc[folds["fold"] != fold, "id"].to_numpy())
    out_dir = Path(summary_path).parent
    result = run_training(
        data,
        train_ids,
        held_out,
        model_cfg,
        train_cfg,
        out_dir,
        job.resources.get("gpu", 0),
        key,
        job.params.get("augment"),
    )
    probs = predict_proba(out_dir / "model.ckpt", data.images, ids=held_out)
    oof = pd.DataFrame(probs, columns=[f"p{c}" for c in range(probs.shape[1])])
    oof.insert(0, "label", data.labels[held_out])
    oof.insert(0, "fold", fold)
    oof.insert(0, "id", held_out)
    write_csv(oof, oof_path)
    metrics = fold_metrics(data.labels[held_out], probs.argmax(axis=1))
    summary = {**result, **metrics, "fold": fold, "n_train": len(train_ids), "n_val": len(held_out)}
    write_json(summary, summary_path)
    return summary


def run_train_final(job: StageJob) -> dict:
    """The final model: with a sweep, the winner's settings on the whole training pool; else train / val.

    With ``train.num_nodes`` x ``train.gpus_per_node`` > 1 inside a SLURM job
    it writes the job file and starts one rank per GPU with srun
    (imgpipe.launch); anywhere else it trains on this machine.
    """
    from imgpipe.launch import launch_ranks, make_job, should_launch

    best = read_best(job.input.get("best"))
    model_cfg, train_cfg = job_sections(job.params, job.threads, best.get("overrides", {}))
    if best:
        log.info("sweep winner %s: %s", best.get("trial"), best.get("overrides"))
        # The sweep chose the settings and how many epochs they need: train on
        # the whole training pool (train + val) for that long, keep the last epoch.
        train_cfg["max_epochs"] = int(best["epochs"])
        train_roles, val_roles = ["train", "val"], []
    else:
        train_roles, val_roles = ["train"], ["val"]
    nodes, gpus = train_cfg["num_nodes"], train_cfg["gpus_per_node"]
    out_dir = Path(job.output["model"]).parent
    if should_launch(nodes, gpus):
        # A SLURM job of nodes x gpus tasks: srun starts one rank per GPU (imgpipe.launch).
        cpus = job.resources.get("cpus_per_gpu")
        if isinstance(cpus, int) and cpus > 0:
            train_cfg["threads"] = cpus  # each rank's share of the job's CPUs
        key = job_key("final", model_cfg, train_cfg, input_stamp(job.input))
        launch = make_job(
            data_inputs(job.input),
            train_roles,
            val_roles,
            model_cfg,
            train_cfg,
            out_dir,
            resume_dir_for(key),
            job.params.get("augment"),
        )
        summary = launch_ranks(launch, cpus_per_task=cpus or None, stdout=sys.stdout)
    else:
        if nodes > 1:
            log.warning(
                "train.num_nodes is %d but this is no SLURM job: training on this "
                "machine only (one node)",
                nodes,
            )
        train_cfg["num_nodes"] = 1
        data = load_training_data(job.input)
        key = job_key("final", model_cfg, train_cfg, input_stamp(job.input))
        summary = run_training(
            data,
            data.ids(*train_roles),
            data.ids(*val_roles),
            model_cfg,
            train_cfg,
            out_dir,
            job.resources.get("gpu", 0),
            key,
            job.params.get("augment"),
        )
    log.info(
        "final model: epoch %d of %d, %.0f images/s on %d %s device(s)",
        summary["best_epoch"],
        summary["epochs"],
        summary["images_per_s"] or 0,
        summary["world_size"],
        summary["accelerator"],
    )
    return summary
