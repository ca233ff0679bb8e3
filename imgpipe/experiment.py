"""A training job as one unit: one function per job kind (sweep trial, k-fold fold, final model).

Each works out, in one place, what the three training rules share: the
model / train sections with the sweep's overrides applied, the job's threads
and devices, which roles it trains and validates on, the key of its resume
state, and whether it trains here or starts srun ranks (imgpipe.launch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from imgpipe import settings
from imgpipe.atomic import read_csv, write_csv, write_json
from imgpipe.config import LAYOUT_KEYS
from imgpipe.dataset import NpyRows, ShardImages, label_codes, load_index, open_images
from imgpipe.split import final_roles, load_split, role_ids
from imgpipe.stage import StageJob
from imgpipe.sweep import apply_overrides

log = logging.getLogger("imgpipe")

RESUME_ROOT = Path(".imgpipe") / "resume"
# Each training job's TensorBoard run: results/tensorboard/<kind>/<job>/ (not a
# Snakemake output: kept across a resume, cleared when the job starts afresh).
TENSORBOARD_ROOT = Path("results") / "tensorboard"
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
    aug_index = read_csv(inputs["aug_index"])
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
    """``train_cfg`` with its schedule sized on the training pool (imgpipe.schedule).

    Trials, folds and the final model are sized on one image count, so they
    share the batch size (``auto``) and the epochs (``min_steps``): the final
    model and the folds run the very schedule the trials were scored at the
    end of.
    """
    from imgpipe.schedule import sized_schedule

    return sized_schedule(train_cfg, pool_size(job.input["split"]))


def image_settings(data: TrainingData, fit: str) -> dict[str, Any]:
    """The image settings the arrays were made with (size and mode as ingested, ``image.fit``)."""
    size, channels = int(data.images.shape[1]), int(data.images.shape[3])
    return {"size": size, "mode": "rgb" if channels == 3 else "gray", "fit": fit}


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


@dataclass(frozen=True)
class TrainingRun:
    """One training run as fit needs it, besides the images, the ids and the devices.

    Built once per job (:func:`training_run`) and handed to the local path
    (:func:`run_training`) and, as JSON in the job file, to every srun rank
    (``imgpipe.launch``); both train through :func:`fit_run`, so what the model
    file records (class names, image settings, augmentation) cannot drift
    between them.
    """

    model: dict
    train: dict
    augment: dict
    image_fit: str
    out_dir: str
    resume_dir: str
    tensorboard_dir: str | None = None
    # A run without validation images takes this temperature (imgpipe.calibration),
    # fitted by the sweep's winning trial; None: fitted on the run's own validation images.
    temperature: float | None = None
    temperature_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> TrainingRun:
        """The run :meth:`to_dict` wrote; ValueError naming what is missing or unknown."""
        names = {field.name for field in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing, unknown = required - set(fields), set(fields) - names
        if missing or unknown:
            raise ValueError(f"training run: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(**fields)

    def absolute(self) -> TrainingRun:
        """The same run with absolute folders (srun ranks may start elsewhere)."""
        return dataclasses.replace(
            self,
            out_dir=str(Path(self.out_dir).resolve()),
            resume_dir=str(Path(self.resume_dir).resolve()),
            tensorboard_dir=(
                str(Path(self.tensorboard_dir).resolve()) if self.tensorboard_dir else None
            ),
        )


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
    from imgpipe.atomic import plain

    temperature, source = winner_temperature(best or {})

    return TrainingRun(
        model=plain(model_cfg),
        train=plain(train_cfg),
        augment=plain(job.params.get("augment") or {}),
        image_fit=str(job.params["fit"]),
        out_dir=str(out_dir),
        resume_dir=str(resume_dir_for(key)),
        tensorboard_dir=str(tensorboard_dir) if tensorboard_dir is not None else None,
        temperature=temperature,
        temperature_source=source,
    )


def winner_temperature(best: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """(temperature, where it was fitted) of the sweep's winning trial, or (None, None) without one.

    The winner trained on the train role and fitted its temperature on the
    val role (imgpipe.training.calibrate_run): the final model and the folds
    after a sweep, which train without validation images, take it.
    """
    if best.get("temperature") is None:
        return None, None
    where = (
        f"the sweep winner {best.get('trial')}'s validation images "
        "(trained on train, fitted on val, last epoch)"
    )
    return float(best["temperature"]), where


def fit_run(
    run: TrainingRun,
    data: TrainingData,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    devices: int | None = None,
) -> dict:
    """Train ``run`` on ``data``: the one call of ``fit`` of the local and the srun path."""
    from imgpipe.dataset import class_names
    from imgpipe.training import fit

    return fit(
        data.images,
        data.labels,
        train_ids,
        val_ids,
        data.aug_images,
        data.aug_sources,
        run.model,
        run.train,
        run.out_dir,
        devices=devices,
        resume_dir=run.resume_dir,
        augment_cfg=run.augment,
        class_names=class_names(data.index),
        image_cfg=image_settings(data, run.image_fit),
        tensorboard_dir=run.tensorboard_dir,
        temperature=run.temperature,
        temperature_source=run.temperature_source,
    )


def run_training(
    data: TrainingData,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    run: TrainingRun,
    job: StageJob,
) -> dict:
    """Train ``run`` on this machine (validating on ``val_ids``), holding the job's GPUs meanwhile."""
    from imgpipe.gpus import claim_devices

    devices, on_gpu = job_devices(job.resources.get("gpu", 0), run.train)
    claim = claim_devices(devices) if on_gpu else contextlib.nullcontext()
    with claim:
        return fit_run(run, data, train_ids, val_ids, devices=devices)


def data_inputs(inputs: Mapping[str, Any]) -> dict[str, str]:
    """The inputs that name a job's training data."""
    return {name: inputs[name] for name in DATA_INPUTS}


# ----------------------------------------------------------------------------- job kinds


def run_sweep_trial(job: StageJob) -> dict:
    """One sweep trial: its overrides, trained on the train role over its schedule, scored on val."""
    overrides = job.params["overrides"]
    model_cfg, train_cfg = job_sections(job, overrides)
    train_cfg = sized_on_pool(train_cfg, job)
    trial = job.wildcards["trial"]
    log.info("trial %s: %s", trial, overrides)
    data = load_training_data(job.input)
    out_dir = Path(job.output["summary"]).parent
    key = resume_key("sweep", job, model_cfg, train_cfg, str(out_dir), name=f"sweep-{trial}")
    run = training_run(job, model_cfg, train_cfg, out_dir, key, tensorboard_dir_for("sweep", trial))
    result = run_training(data, data.ids("train"), data.ids("val"), run, job)
    summary = {**result, "trial": trial, "overrides": overrides}
    write_json(summary, job.output["summary"])
    return summary


def fold_validation(data: TrainingData, train_ids: np.ndarray, job: StageJob) -> np.ndarray:
    """An inner validation split of a fold's training part (group-aware, stratified, seeded)."""
    from imgpipe.split import draw_groups

    rows = data.index.set_index("id").loc[train_ids, ["label", "group"]].reset_index()
    split = job.params["split"]
    held = draw_groups(rows, split["val_fraction"], split["seed"], "fold validation")
    return rows["id"].to_numpy()[held]


def run_cv_fold(job: StageJob) -> dict:
    """Train on every fold but this one with the final model's recipe, then predict this one.

    The held-out fold never influences its model. Like the final model, the
    fold runs the whole schedule and keeps its last epoch: with a sweep, the
    winner's settings on all of the fold's training images (no validation);
    without one, on the fold's training images less an inner validation split
    (as the final model trains on the train role and validates on val; the
    inner split is only scored). Its out-of-fold
    probabilities go to cleanlab. A fold at or beyond the number of folds
    actually used (``cv.adapt_k`` lowered k) writes an empty table and a
    summary marked ``skipped``; the fold's model and history (written beside
    them) are not declared outputs for that reason.
    """
    from imgpipe.baselines import both_baselines
    from imgpipe.calibration import calibrated_probabilities, calibration_summary
    from imgpipe.cv import fold_metrics, folds_used
    from imgpipe.dataset import class_names
    from imgpipe.predict import predict_logits

    fold = int(job.wildcards["fold"])
    oof_path, summary_path = job.output["oof"], job.output["summary"]
    folds = read_csv(job.input["folds"])
    if fold >= folds_used(folds):
        log.info("fold %d skipped: only %d folds are used", fold, folds_used(folds))
        write_csv(pd.DataFrame(columns=["id", "fold", "label"]), oof_path)
        if "history" in job.output:  # a declared output: an empty training history
            write_csv(pd.DataFrame(columns=["epoch", "step", "train_loss"]), job.output["history"])
        write_json({"fold": fold, "skipped": True}, summary_path)
        return {"skipped": True}
    best = read_best(job.input.get("best"))
    model_cfg, train_cfg = job_sections(job, best.get("overrides", {}))
    train_cfg = sized_on_pool(train_cfg, job)
    data = load_training_data(job.input)
    held_out = np.sort(folds.loc[folds["fold"] == fold, "id"].to_numpy())
    # Fold -1: images of classes that are one single group; they always train.
    fold_train = np.sort(folds.loc[folds["fold"] != fold, "id"].to_numpy())
    if best:
        train_ids, val_ids = fold_train, np.zeros(0, np.int64)
    else:
        val_ids = np.sort(fold_validation(data, fold_train, job))
        train_ids = np.setdiff1d(fold_train, val_ids)
    log.info(
        "fold %d: training on %d, validating on %d (%s), scoring %d held-out images",
        fold,
        len(train_ids),
        len(val_ids),
        "none: the sweep winner's recipe" if best else "an inner split of the fold's training part",
        len(held_out),
    )
    out_dir = Path(summary_path).parent
    key = resume_key("cv", job, fold, model_cfg, train_cfg, best, name=f"cv-fold-{fold}")
    run = training_run(
        job, model_cfg, train_cfg, out_dir, key, tensorboard_dir_for("cv", f"fold-{fold}"), best
    )
    result = run_training(data, train_ids, val_ids, run, job)
    # The fold's model was built from this config's model.name: its factory, if any, is trusted.
    logits = predict_logits(
        out_dir / "model.ckpt", data.images, ids=held_out, model_factory=model_cfg["name"]
    )
    # Calibrated like the final model (imgpipe.calibration): ECE / NLL before and after on the
    # held-out fold go to summary.csv.
    temperature = result.get("temperature", 1.0)
    calibration = calibration_summary(
        logits, data.labels[held_out], temperature, result.get("temperature_fitted_on", "none")
    )
    calibration.pop("reliability")
    probs = calibrated_probabilities(logits, temperature)
    oof = pd.DataFrame(probs, columns=[f"p{c}" for c in range(probs.shape[1])])
    oof.insert(0, "label", data.labels[held_out])
    oof.insert(0, "fold", fold)
    oof.insert(0, "id", held_out)
    write_csv(oof, oof_path)
    metrics = fold_metrics(data.labels[held_out], probs.argmax(axis=1))
    # The reference points on the same images: fitted on what the fold's model
    # trained on, scored on its held-out images (imgpipe.baselines).
    baselines = both_baselines(
        data.images, data.labels, train_ids, held_out, class_names(data.index)
    )
    summary = {
        **result,
        **metrics,
        "fold": fold,
        "n_train": len(train_ids),
        "n_inner_val": len(val_ids),
        "n_held_out": len(held_out),
        "baselines": baselines,
        "calibration": calibration,
    }
    write_json(summary, summary_path)
    return summary


def run_train_final(job: StageJob) -> dict:
    """The final model: with a sweep, the winner's recipe on the whole training pool; else train / val.

    With ``train.num_nodes`` x ``train.gpus_per_node`` > 1 inside a SLURM job
    it writes the job file and starts one rank per GPU with srun
    (imgpipe.launch); anywhere else it trains on this machine.
    """
    from imgpipe.launch import launch_ranks, make_job, should_launch

    best = read_best(job.input.get("best"))
    model_cfg, train_cfg = job_sections(job, best.get("overrides", {}))
    train_cfg = sized_on_pool(train_cfg, job)
    # After a sweep (it chose the settings): the whole training pool (train + val), the
    # winner's whole schedule (the one it was scored at the end of), no validation.
    train_roles, val_roles = final_roles(bool(best))
    if best:
        log.info("sweep winner %s: %s", best.get("trial"), best.get("overrides"))
    nodes, gpus = train_cfg["num_nodes"], train_cfg["gpus_per_node"]
    out_dir = Path(job.output["model"]).parent
    key = resume_key("final", job, model_cfg, train_cfg)
    launching = should_launch(nodes, gpus)
    cpus = job.resources.get("cpus_per_gpu")
    if launching and isinstance(cpus, int) and cpus > 0:
        train_cfg["threads"] = cpus  # each rank's share of the job's CPUs
    if not launching:
        if nodes > 1:
            log.warning(
                "train.num_nodes is %d but this is no SLURM job: training on this "
                "machine only (one node)",
                nodes,
            )
        train_cfg["num_nodes"] = 1
    # The one description of this run, for the srun ranks and the local fit alike.
    run = training_run(
        job, model_cfg, train_cfg, out_dir, key, tensorboard_dir_for("final", "final"), best
    )
    if launching:
        # A SLURM job of nodes x gpus tasks: srun starts one rank per GPU (imgpipe.launch).
        launch = make_job(data_inputs(job.input), train_roles, val_roles, run)
        summary = launch_ranks(launch, cpus_per_task=cpus or None, stdout=sys.stdout)
    else:
        data = load_training_data(job.input)
        summary = run_training(data, data.ids(*train_roles), data.ids(*val_roles), run, job)
    record_test_metrics(job, out_dir / "model.ckpt", model_cfg["name"])
    log.info(
        "final model: %d epochs, %d steps of batch %d, %.0f images/s on %d %s device(s)",
        summary["epochs"],
        summary["steps"],
        summary["batch_size"],
        summary["images_per_s"] or 0,
        summary["world_size"],
        summary["accelerator"],
    )
    return summary


def record_test_metrics(
    job: StageJob, model_path: str | os.PathLike, model_name: str | None = None
) -> dict:
    """Complete the final model file: the clean settings it expects and its test-set metrics.

    Inference only (nothing is chosen on the test images): the TEST role is
    predicted with the model just trained and ``test_metrics`` (n_test,
    accuracy, balanced_accuracy, f1_macro, as ``imgpipe.evaluate`` computes
    them) join the file's ``imgpipe`` entry, with ``train_class_counts`` (its
    training images per class) and the quality-check settings of
    ``clean`` and ``ingest.max_pixels`` that prediction applies to new files.
    The file is rewritten atomically; returns the entry.
    """
    import torch

    from imgpipe.atomic import plain
    from imgpipe.dataset import class_names
    from imgpipe.metrics import headline_metrics
    from imgpipe.modelfile import METADATA_KEY, QUALITY_KEYS
    from imgpipe.predict import predict_proba
    from imgpipe.training import save_torch

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
        headline = headline_metrics(data.labels[test_ids], probs.argmax(axis=1))
        metrics |= {k: headline[k] for k in ("accuracy", "balanced_accuracy", "f1_macro")}
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
