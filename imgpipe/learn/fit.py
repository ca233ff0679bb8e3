"""Train a classifier from the ``model:`` / ``train:`` config with Lightning's Trainer.

``fit`` is the one entry point of the final training, the sweep trials and the
k-fold jobs: images (an array or the shards on disk) and ids in, files out
(``model.ckpt``, ``history.csv``, ``summary.json``). Inference lives in
``imgpipe.infer.inference``.

Multi-device runs (``devices > 1``) use DDP with the *fork* launcher
(``ddp_fork``; gloo on the CPU, NCCL on GPUs). Tested alternatives:
Lightning's default "ddp" launcher starts each extra rank by re-running
``sys.argv``: under pytest that re-runs the test session, under a Snakemake
``script:`` the whole script (claiming GPUs again, truncating the log).
"ddp_spawn" re-imports the main module in every rank: an unguarded Snakemake
script then runs its whole body again in each rank and fails. Fork re-runs
nothing and copies nothing (the ranks share the parent's arrays), from pytest
and from Snakemake alike. Its one condition: CUDA must not be initialised in
the parent, so ``fit`` only asks NVML about GPUs (Lightning sets
PYTORCH_NVML_BASED_CUDA_CHECK) and nvidia-smi about bf16. A caller that did
use CUDA before ``fit`` gets "ddp_spawn", which needs its main module guarded
by ``if __name__ == "__main__":``. In the ranks imgpipe.learn.launch starts with
srun, srun has already started one process per rank and plain "ddp" attaches
to them; any other process (one-process fits included) ignores SLURM's tasks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

from imgpipe.core.atomic import plain, write_text
from imgpipe.core.errors import DataError
from imgpipe.data.dataset import channel_stats
from imgpipe.infer.modelfile import METADATA_KEY, model_metadata
from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.factory import normalisation
from imgpipe.learn.image_datamodule import ImageDataModule, Images
from imgpipe.learn.schedule import sized_schedule
from imgpipe.learn.trainer import (
    LAST_CHECKPOINT,
    RunPlan,
    combined_history,
    make_trainer,
    monitor_mode,
    plan_run,
    resume_point,
    run_hparams,
    save_torch,
    tensorboard_logger,
)
from imgpipe.learn.training_run import TrainingData, TrainingRun, check_images_match
from imgpipe.workflow import settings

log = logging.getLogger("imgpipe")

CHECKPOINT_KEYS = (
    "state_dict",
    "hyper_parameters",
    "epoch",
    "global_step",
    "pytorch-lightning_version",
)


# The model file's self-description (plain types only: loads stay weights_only-safe).
# ---------------------------------------------------------------- trainer pieces


# ---------------------------------------------------------------- TensorBoard


# ---------------------------------------------------------------- fit


def class_weights(
    train_labels: np.ndarray, num_classes: int, train_cfg: Mapping
) -> list[float] | None:
    """Loss weight per class: ``balanced`` gives n / (classes x count) (scikit-learn's), else None.

    A class with no training image gets weight 0 (it has no term in the loss anyway).
    """
    if train_cfg["class_weights"] != "balanced":
        return None
    counts = np.bincount(np.asarray(train_labels), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(train_labels) / (present.sum() * counts[present])
    return weights.tolist()


def check_run_ids(labels: np.ndarray, train_ids: np.ndarray, val_ids: np.ndarray) -> None:
    """Raise DataError when the ids cannot support a training run."""
    if len(train_ids) == 0:
        raise DataError("no training images in this run")
    if np.intersect1d(train_ids, val_ids).size:
        raise DataError("some images are both in the training and the validation set of this run")
    for name, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) and (ids.min() < 0 or ids.max() >= len(labels)):
            raise DataError(f"{name} ids outside 0..{len(labels) - 1}")
    if len(np.unique(labels[train_ids])) < 2:
        raise DataError("the training images of this run hold a single class")


def fit(
    images: Images,
    labels: np.ndarray,
    train_ids: Sequence[int],
    val_ids: Sequence[int],
    aug_images: Images | None,
    aug_sources: np.ndarray | None,
    model_cfg: Mapping,
    train_cfg: Mapping,
    out_dir: str | os.PathLike,
    devices: int | None = None,
    resume_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    augment_cfg: Mapping | None = None,
    class_names: Sequence[str] | None = None,
    image_cfg: Mapping | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    temperature: float | None = None,
    temperature_source: str | None = None,
) -> dict:
    """Train on ``train_ids`` over the whole schedule, scoring each epoch on ``val_ids``; write the files.

    The model kept (model.ckpt) is the last epoch's, with or without
    ``val_ids``: the end of the schedule, the point a sweep trial is scored at
    (``score``: the last epoch's monitored metric), never a lucky epoch. The
    schedule is sized by ``imgpipe.learn.schedule.sized_schedule`` (batch size
    ``auto``, ``min_steps``); outputs: model.ckpt, history.csv, summary.json.

    ``images`` are uint8 (N, S, S, C) (a numpy array, or the shards on disk as
    ``imgpipe.data.dataset.ShardImages``: read batch by batch), ``labels`` integer
    codes, ids row positions. ``devices``: processes to train on (GPUs when present, else CPU
    processes; default 1 GPU or ``train.cpu_devices``). ``resume_dir`` keeps
    Lightning's last.ckpt between attempts: a rerun after a kill continues
    from it; it is removed after success. ``threads``: the job's CPU threads,
    used when ``train.threads`` is null. ``augment_cfg``: the ``augment``
    section (the policy applied to training batches on the device).
    ``class_names`` (label order) and ``image_cfg`` (size, mode, fit) are kept
    in the checkpoint so that it describes itself. ``tensorboard_dir``: also
    log to TensorBoard there (see ``tensorboard_logger``; kept after success,
    continued on resume, cleared on a fresh start). Calibration
    (``imgpipe.learn.calibration``): with ``val_ids``, the temperature is fitted on
    the last epoch's logits of the validation images; without them the model
    takes ``temperature`` (fitted elsewhere: ``temperature_source`` says
    where), or 1. It is stored in model.ckpt's ``hyper_parameters``. Returns
    the summary.
    """
    started = time.perf_counter()
    train_ids = np.asarray(train_ids, dtype=np.int64)
    val_ids = np.asarray(val_ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    check_run_ids(labels, train_ids, val_ids)
    # The schema's defaults for keys the caller left out (a run's sections are complete).
    model_cfg, train_cfg = plain(model_cfg), settings.filled("train", plain(train_cfg))
    train_cfg = sized_schedule(train_cfg, len(train_ids))
    plan = plan_run(train_cfg, devices, threads)
    torch.set_num_threads(plan.rank_threads)
    pl.seed_everything(train_cfg["seed"], workers=True, verbose=False)
    num_classes = int(labels.max()) + 1
    in_channels = images.shape[3]
    mean, std = normalisation(model_cfg, in_channels, *channel_stats(images, train_ids))
    module = ImageClassifier(
        model_cfg,
        train_cfg,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=images.shape[1],
        mean=mean,
        std=std,
        augment_cfg=plain(augment_cfg or {}),
        class_names=list(class_names) if class_names is not None else None,
        image_cfg=plain(image_cfg) if image_cfg is not None else None,
        class_weights=class_weights(labels[train_ids], num_classes, train_cfg),
    )
    data = ImageDataModule(
        images,
        labels,
        train_ids,
        val_ids,
        aug_images,
        aug_sources,
        batch_size=train_cfg["batch_size"],
        num_workers=train_cfg["num_workers"],
        seed=train_cfg["seed"],
        balanced=train_cfg["sampler"] == "balanced",
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private = resume_dir is None
    state_dir = Path(tempfile.mkdtemp(prefix=".fit-", dir=out_dir)) if private else Path(resume_dir)
    try:
        resume_from, resumed_epoch = resume_point(state_dir)
        if resume_from is not None:
            log.info("resuming from %s (epoch %d done)", resume_from, resumed_epoch)
        tensorboard = (
            tensorboard_logger(tensorboard_dir, resume_from)
            if tensorboard_dir is not None
            else None
        )
        trainer = make_trainer(
            train_cfg,
            plan,
            state_dir,
            validate=len(val_ids) > 0,
            tensorboard=tensorboard,
            hparams=run_hparams(model_cfg, train_cfg),
        )
        log.info(
            "training %s on %d images (+%d augmented), validating on %d; %s x%d, %s, %s",
            model_cfg["name"],
            len(train_ids),
            data.aug_count,
            len(val_ids),
            "gpu" if plan.on_gpu else "cpu",
            plan.world_size,
            plan.strategy,
            plan.precision,
        )
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    except BaseException:
        if private:  # nobody can resume from it: do not leave it behind
            shutil.rmtree(state_dir, ignore_errors=True)
        raise
    if trainer.global_rank != 0:
        # srun started every rank and each returns here: rank 0 alone writes the outputs.
        return {"global_rank": trainer.global_rank, "world_size": trainer.world_size}
    counts = {
        "train_images": len(train_ids),
        "augmented_images": data.aug_count,
        "val_images": len(val_ids),
        # The schedule as run (imgpipe.learn.schedule): steps are optimizer steps over every epoch.
        "batch_size": train_cfg["batch_size"],
        "schedule_images": train_cfg["schedule_images"],
        "scheduled_epochs": train_cfg["max_epochs"],
    }
    calibration = calibrate_run(
        state_dir / "checkpoints" / LAST_CHECKPOINT,
        images,
        labels,
        val_ids,
        model_cfg,
        device="cuda" if plan.on_gpu else "cpu",
        batch_size=int(train_cfg["batch_size"]),
        given=(temperature, temperature_source),
    )
    summary = write_outputs(
        state_dir, out_dir, train_cfg, plan, counts, resumed_epoch, started, calibration
    )
    shutil.rmtree(state_dir, ignore_errors=True)
    log.info(
        "%s %.4f at the last epoch (best %.4f); %d steps of batch %d; %.1f s",
        summary["monitor"],
        summary["score"],
        summary["best_score"],
        summary["steps"],
        summary["batch_size"],
        summary["seconds"],
    )
    return summary


def write_outputs(
    state_dir: Path,
    out_dir: Path,
    train_cfg: Mapping,
    plan: RunPlan,
    counts: Mapping[str, int],
    resumed_epoch: int | None,
    started: float,
    calibration: Mapping[str, Any] | None = None,
) -> dict:
    """Write the last epoch's checkpoint (weights, hyper-parameters, metadata), history.csv and summary.json.

    ``score`` is the last epoch's monitored metric (what a sweep trial is
    ranked by); ``best_score`` / ``best_epoch`` (the best epoch's) are only
    reported. ``calibration`` (``calibrate_run``): its ``temperature`` goes
    into the hyper-parameters, all of it into the summary.
    """
    saved = torch.load(
        state_dir / "checkpoints" / LAST_CHECKPOINT, map_location="cpu", weights_only=True
    )
    kept = {k: saved[k] for k in CHECKPOINT_KEYS if k in saved}
    calibration = dict(calibration or {"temperature": 1.0, "temperature_fitted_on": "none"})
    kept["hyper_parameters"] = {
        **saved["hyper_parameters"],
        "temperature": float(calibration["temperature"]),
    }
    kept[METADATA_KEY] = model_metadata(kept["hyper_parameters"])
    save_torch(kept, out_dir / "model.ckpt")
    history = combined_history(state_dir / "logs")
    write_text(history.to_csv(index=False), out_dir / "history.csv")
    stats_path = state_dir / "run-stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    train_seconds = stats.get("train_seconds")
    samples = sum(stats.get("samples_per_rank") or [0])
    monitor, mode = monitor_mode(train_cfg)
    epochs = int(history["epoch"].max()) + 1 if len(history) else 0
    # From the history (the step count at each epoch's end, from 0): the forked
    # parent of a DDP run never ran the loop its trainer would count.
    steps = int(history["step"].max()) + 1 if len(history) else 0
    summary = {
        "monitor": monitor,
        "score": _last_value(history, monitor),
        "last_val_acc": _last_value(history, "val_acc"),
        "last_val_loss": _last_value(history, "val_loss"),
        "best_score": _best_score(history, monitor, mode),
        "best_epoch": _best_epoch(history, monitor, mode),
        "model_epoch": int(saved["epoch"]),
        "epochs": epochs,
        "steps": steps,
        "steps_per_epoch": steps // epochs if epochs else 0,
        "stopped_early": bool(stats.get("stopped_early", False)),
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "images_per_s": samples / train_seconds if train_seconds else None,
        "accelerator": "gpu" if plan.on_gpu else "cpu",
        "devices": plan.devices,
        "num_nodes": plan.num_nodes,
        "world_size": stats.get("world_size", plan.world_size),
        "samples_per_rank": stats.get("samples_per_rank"),
        "strategy": plan.strategy,
        "precision": plan.precision,
        "threads_per_rank": plan.rank_threads,
        **counts,
        **calibration,
        "resumed_from_epoch": resumed_epoch,
        "attempts": int(history["attempt"].max()) + 1 if len(history) else 1,
    }
    write_text(json.dumps(summary, indent=2) + "\n", out_dir / "summary.json")
    return summary


def validation_logits(
    state: Mapping[str, Any],
    images: Images,
    ids: np.ndarray,
    model_name: str,
    device: str,
    batch_size: int,
) -> np.ndarray:
    """Raw logits (N, classes) of ``images[ids]`` under a saved checkpoint (eval mode, float32)."""
    from imgpipe.infer.modelfile import validate_model_file
    from imgpipe.learn.image_datamodule import to_uint8_nchw

    # The run's own model: its model.name (a package.module:factory included) is the config's.
    hparams, weights, _ = validate_model_file(state, model_name)
    module = ImageClassifier(**hparams)
    module.load_state_dict(weights, strict=True)
    module = module.eval().to(device)
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            pixels = to_uint8_nchw(images[ids[start : start + batch_size]]).to(device)
            outputs.append(module(module.preprocess(pixels)).float().cpu())
    return torch.cat(outputs).numpy()


def calibrate_run(
    checkpoint: Path,
    images: Images,
    labels: np.ndarray,
    val_ids: np.ndarray,
    model_cfg: Mapping,
    device: str,
    batch_size: int,
    given: tuple[float | None, str | None] = (None, None),
) -> dict[str, Any]:
    """The run's temperature: fitted on the last epoch's validation logits, else the one ``given``.

    Returns the summary fields ``temperature``, ``temperature_fitted_on`` and,
    when fitted here, the validation NLL before and after
    (``val_nll_before`` / ``val_nll_after``). Without validation images and
    without a given temperature the model keeps T = 1.
    """
    from imgpipe.learn.calibration import checked_temperature, fit_temperature, nll

    if len(val_ids) == 0:
        temperature, source = given
        if temperature is None:
            return {"temperature": 1.0, "temperature_fitted_on": "none (no validation images)"}
        return {
            "temperature": checked_temperature(temperature),
            "temperature_fitted_on": source or "given",
        }
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    logits = validation_logits(state, images, val_ids, model_cfg["name"], device, batch_size)
    found = fit_temperature(logits, labels[val_ids])
    log.info("temperature %.4f fitted on %d validation images", found, len(val_ids))
    return {
        "temperature": found,
        "temperature_fitted_on": f"this run's {len(val_ids)} validation images (last epoch)",
        "val_nll_before": nll(logits, labels[val_ids], 1.0),
        "val_nll_after": nll(logits, labels[val_ids], found),
    }


def fit_run(
    run: TrainingRun,
    data: TrainingData,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    devices: int | None = None,
) -> dict:
    """Train ``run`` on ``data``: the one call of ``fit`` of the local and the srun path."""
    from imgpipe.data.dataset import class_names

    check_images_match(run.image, data.images.shape)
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
        image_cfg=dict(run.image),
        tensorboard_dir=run.tensorboard_dir,
        temperature=run.temperature,
        temperature_source=run.temperature_source,
    )


def _last_value(history: pd.DataFrame, metric: str) -> float:
    """The last epoch's value of ``metric`` (nan when the run did not validate)."""
    if metric not in history or history.empty:
        return float("nan")
    value = history.sort_values("epoch")[metric].iloc[-1]
    return float(value) if pd.notna(value) else float("nan")


def _best_epoch(history: pd.DataFrame, monitor: str, mode: str) -> int | None:
    """The epoch of the best ``monitor`` value, the earliest on a tie (None without validation)."""
    values = history.set_index("epoch")[monitor].dropna() if monitor in history else None
    if values is None or values.empty:
        return None
    return int(values.idxmax() if mode == "max" else values.idxmin())


def _best_score(history: pd.DataFrame, monitor: str, mode: str) -> float:
    values = history[monitor].dropna() if monitor in history else pd.Series(dtype=float)
    if values.empty:
        return float("nan")
    return float(values.max() if mode == "max" else values.min())
