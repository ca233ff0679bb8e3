"""A training job as one unit: one function per job kind (sweep trial, k-fold fold, final model).

Each works out, in one place, what the three training rules share: the
model / train sections with the sweep's overrides applied, the job's threads
and devices, which roles it trains and validates on, the key of its resume
state, and whether it trains here or starts srun ranks (imgpipe.learn.launch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imgpipe.data.split import final_roles, load_split, role_ids
from imgpipe.learn.sweep import apply_overrides
from imgpipe.learn.training_run import (
    TrainingData,
    TrainingRun,
    image_settings_of,
    load_training_data,
)
from imgpipe.workflow import settings
from imgpipe.workflow.config import LAYOUT_KEYS
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")

RESUME_ROOT = Path(".imgpipe") / "resume"
# Each training job's TensorBoard run: results/tensorboard/<kind>/<job>/ (not a
# Snakemake output: kept across a resume, cleared when the job starts afresh).
TENSORBOARD_ROOT = Path("results") / "tensorboard"
# The inputs every training job reads (the shard arrays come with the index's ``array`` column).
DATA_INPUTS = ("index", "split", "aug_images", "aug_index")


# ----------------------------------------------------------------------------- settings


def read_best(path: str | None) -> dict[str, Any]:
    """The sweep winner's overrides and epoch count from best.yaml (empty when no sweep)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def job_sections(job: StageJob, overrides: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """(model, train) sections of a job: the rule's params with ``overrides`` applied.

    The layout keys a rule's params leave out (trials, folds) are filled in for
    one process: the job's threads and the configured loader workers (neither
    changes a result).
    """
    sections = apply_overrides(
        {"model": job.params["model"], "train": job.params["train"]}, dict(overrides or {})
    )
    model_cfg, train_cfg = sections["model"], sections["train"]
    # The one read of the config beside the params: the loader workers of a trial or fold
    # decide no result, and as a param they would rerun every trial (config.LAYOUT_KEYS).
    configured = settings.filled("train", job.config.get("train"))
    single = {"num_nodes": 1, "gpus_per_node": 1, "cpu_devices": 1, "threads": None}
    for key in LAYOUT_KEYS:
        train_cfg.setdefault(key, single.get(key, configured[key]))
    train_cfg["threads"] = train_cfg.get("threads") or job.threads
    return model_cfg, train_cfg


def pool_size(split_path: str | os.PathLike) -> int:
    """Images in the training pool (train + val roles): what every job's schedule is sized on."""
    return len(role_ids(load_split(split_path), "train", "val"))


def sized_on_pool(train_cfg: dict, job: StageJob) -> dict:
    """``train_cfg`` with its schedule sized on the training pool (imgpipe.learn.schedule).

    Trials, folds and the final model are sized on one image count, so they
    share the batch size (``auto``) and the epochs (``min_steps``): the final
    model and the folds run the very schedule the trials were scored at the
    end of.
    """
    from imgpipe.learn.schedule import sized_schedule

    return sized_schedule(train_cfg, pool_size(job.input["split"]))


def job_key(*parts: Any) -> str:
    """A stable hash of a job's identity (its config, code and the stat of its inputs)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def resume_key(kind: str, job: StageJob, *parts: Any, name: str | None = None) -> str:
    """The key of a job's resume state: its kind, settings, code fingerprint and input files.

    A rerun after a kill resumes only when nothing that decides the result
    changed: a new config, an edit of the code it runs or new inputs start afresh.
    """
    digest = job_key(kind, *parts, job.code, input_stamp(job.input))
    # Readable folder names (.imgpipe/resume/final-<hash>, cv-fold-2-<hash>, ...).
    return f"{name or kind}-{digest}"


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


def tensorboard_dir_for(kind: str, name: str) -> Path:
    """Where a training job writes its TensorBoard run: ``results/tensorboard/<kind>/<name>``."""
    return TENSORBOARD_ROOT / kind / name


def job_devices(gpu_resource: int, train_cfg: Mapping) -> tuple[int, bool]:
    """(devices, on_gpu) for a job: its ``gpu`` resource, or ``train.cpu_devices`` without GPUs."""
    if gpu_resource and gpu_resource > 0:
        return int(gpu_resource), True
    return int(train_cfg["cpu_devices"]), False


# ----------------------------------------------------------------------------- training


def training_run(
    job: StageJob,
    model_cfg: Mapping,
    train_cfg: Mapping,
    out_dir: str | os.PathLike,
    key: str,
    tensorboard_dir: str | os.PathLike | None = None,
    best: Mapping[str, Any] | None = None,
) -> TrainingRun:
    """The description of a job's training run: its sections, image settings and folders.

    The resume state lives under ``.imgpipe/resume/<key>``, ``key`` naming the
    job's config, code and inputs, so a rerun after a kill continues from the
    last checkpoint while a changed job never resumes a stale one.
    ``tensorboard_dir``: the job's TensorBoard run (``tensorboard_dir_for``).
    ``best``: the sweep's best.yaml, whose winning trial's temperature a run
    without validation images takes (``winner_temperature``).
    """
    from imgpipe.core.atomic import plain

    temperature, source = winner_temperature(best or {})

    return TrainingRun(
        model=plain(model_cfg),
        train=plain(train_cfg),
        augment=plain(job.params.get("augment") or {}),
        image=image_settings_of(job.input["image"]),
        out_dir=str(out_dir),
        resume_dir=str(resume_dir_for(key)),
        tensorboard_dir=str(tensorboard_dir) if tensorboard_dir is not None else None,
        temperature=temperature,
        temperature_source=source,
    )


def winner_temperature(best: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """(temperature, where it was fitted) of the sweep's winning trial, or (None, None) without one.

    The winner trained on the train role and fitted its temperature on the
    val role (imgpipe.learn.fit.calibrate_run): the final model and the folds
    after a sweep, which train without validation images, take it.
    """
    if best.get("temperature") is None:
        return None, None
    where = (
        f"the sweep winner {best.get('trial')}'s validation images "
        "(trained on train, fitted on val, last epoch)"
    )
    return float(best["temperature"]), where


def run_training(
    data: TrainingData,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    run: TrainingRun,
    job: StageJob,
) -> dict:
    """Train ``run`` on this machine (validating on ``val_ids``), holding the job's GPUs meanwhile."""
    from imgpipe.learn.fit import fit_run
    from imgpipe.learn.gpus import claim_devices

    devices, on_gpu = job_devices(job.resources.get("gpu", 0), run.train)
    claim = claim_devices(devices) if on_gpu else contextlib.nullcontext()
    with claim:
        return fit_run(run, data, train_ids, val_ids, devices=devices)


def data_inputs(inputs: Mapping[str, Any]) -> dict[str, str]:
    """The inputs that name a job's training data."""
    return {name: inputs[name] for name in DATA_INPUTS}


# ----------------------------------------------------------------------------- job kinds


def fold_validation(data: TrainingData, train_ids: np.ndarray, job: StageJob) -> np.ndarray:
    """An inner validation split of a fold's training part (group-aware, stratified, seeded)."""
    from imgpipe.data.split import draw_groups

    rows = data.index.set_index("id").loc[train_ids, ["label", "group"]].reset_index()
    split = job.params["split"]
    held = draw_groups(rows, split["val_fraction"], split["seed"], "fold validation")
    return rows["id"].to_numpy()[held]


def record_test_metrics(
    job: StageJob, model_path: str | os.PathLike, model_name: str | None = None
) -> dict:
    """Complete the final model file: the clean settings it expects and its test-set metrics.

    Inference only (nothing is chosen on the test images): the TEST role is
    predicted with the model just trained and ``test_metrics`` (n_test,
    accuracy, balanced_accuracy, f1_macro: ``imgpipe.learn.metrics.test_set_metrics``,
    the function evaluate's metrics.json comes from) join the file's
    ``imgpipe`` entry, with ``train_class_counts`` (its training images per class) and the quality-check settings of
    ``clean`` and ``ingest.max_pixels`` that prediction applies to new files.
    The file is rewritten atomically; returns the entry.
    """
    import torch

    from imgpipe.core.atomic import plain
    from imgpipe.data.dataset import class_names
    from imgpipe.infer.inference import predict_proba
    from imgpipe.infer.modelfile import METADATA_KEY, QUALITY_KEYS
    from imgpipe.learn.metrics import MODEL_FILE_TEST_KEYS, test_set_metrics
    from imgpipe.learn.trainer import save_torch

    data = load_training_data(job.input)
    test_ids = data.ids("test")
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    metadata = dict(state.get(METADATA_KEY) or {})
    # The rule's params (the config's, defaults filled in): the quality-check settings.
    clean_cfg = job.params["clean"]
    metadata["clean"] = {key: clean_cfg[key] for key in QUALITY_KEYS if key in clean_cfg}
    metadata["max_pixels"] = int(job.params["max_pixels"])
    extensions = job.params["extensions"]
    metadata["extensions"] = list(extensions)
    # The final model's training images per class: `imgpipe predict` scores the
    # majority-class baseline of a labelled input with them.
    train_ids = data.ids(*final_roles(bool(read_best(job.input.get("best"))))[0])
    names = class_names(data.index)
    counts = np.bincount(data.labels[train_ids], minlength=len(names))
    metadata["train_class_counts"] = {name: int(n) for name, n in zip(names, counts, strict=True)}
    metrics: dict[str, Any] = {"n_test": len(test_ids)}
    if len(test_ids):
        # model_name: the config's (a package.module:factory among them is trusted).
        probs = predict_proba(model_path, data.images, ids=test_ids, model_factory=model_name)
        scores = test_set_metrics(data.labels[test_ids], probs.argmax(axis=1), names)
        metrics |= {key: scores[key] for key in MODEL_FILE_TEST_KEYS}
        log.info(
            "final model on the %d test images: accuracy %.4f, macro F1 %.4f",
            len(test_ids),
            metrics["accuracy"],
            metrics["f1_macro"],
        )
    metadata["test_metrics"] = metrics
    state[METADATA_KEY] = plain(metadata)
    save_torch(state, model_path)
    return metadata
