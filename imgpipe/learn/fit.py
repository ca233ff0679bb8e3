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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from pytorch_lightning.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from imgpipe.core.atomic import plain, write_stream, write_text
from imgpipe.core.errors import DataError
from imgpipe.data.dataset import channel_stats
from imgpipe.infer.modelfile import METADATA_KEY, model_metadata
from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.gpus import gpu_supports_bf16
from imgpipe.learn.image_datamodule import ImageDataModule, Images
from imgpipe.learn.models import normalisation, parse_freeze, set_backbone_trainable
from imgpipe.learn.monitor import metric_mode
from imgpipe.learn.progress_callback import TrainingProgress
from imgpipe.learn.schedule import sized_schedule
from imgpipe.learn.training_run import LAUNCHED_VAR, TrainingData, TrainingRun, check_images_match
from imgpipe.workflow import settings
from imgpipe.workflow.config import LAYOUT_KEYS

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


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (same-folder temp file, fsync, rename)."""
    write_stream(lambda fh: torch.save(obj, fh), path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file in the same folder, fsync, then rename over the target.

    Lightning's own "atomic" save goes through an fsspec transaction whose
    temporary file lives in the system temp folder and is moved (copied when
    on another file system) at commit, so a kill can still leave a truncated file.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` atomically."""
        save_torch(checkpoint, path)


def resolve_precision(setting: str, on_gpu: bool) -> str:
    """``auto``: bf16-mixed on GPUs with bf16 support, 32-bit otherwise; other values pass through."""
    if setting != "auto":
        return setting
    return "bf16-mixed" if on_gpu and gpu_supports_bf16() else "32-true"


def started_by_srun(world_size: int) -> bool:
    """True in a rank that imgpipe.learn.launch started with srun: SLURM has wired the ``world_size`` ranks.

    Only such a rank attaches to SLURM's tasks. Any other process trains as
    the processes it starts itself, even inside a SLURM allocation of several
    tasks (a local executor's job, a one-process fit).
    """
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    return (
        world_size > 1
        and slurm_tasks > 1
        and bool(os.environ.get(LAUNCHED_VAR))
        and SLURMEnvironment.detect()
    )


def choose_strategy(world_size: int, on_gpu: bool) -> str:
    """Strategy name for this many processes (see the module docstring for why fork)."""
    if started_by_srun(world_size):
        return "ddp"
    if world_size <= 1:
        return "auto"
    if on_gpu and torch.cuda.is_initialized():
        log.warning("CUDA is already initialised in this process: using ddp_spawn, not ddp_fork")
        return "ddp_spawn"
    return "ddp_fork"


def trainer_strategy(plan: RunPlan, train_cfg: Mapping) -> str:
    """The strategy name for the Trainer: a backbone unfrozen mid-run under DDP needs find-unused."""
    unfreezes_later = isinstance(parse_freeze(train_cfg["freeze"]), int) and (
        parse_freeze(train_cfg["freeze"]) > 0
    )
    if plan.strategy.startswith("ddp") and unfreezes_later:
        return f"{plan.strategy}_find_unused_parameters_true"
    return plan.strategy


def trainer_plugins(strategy: str) -> list:
    """Atomic checkpoint writes; and unless srun started the ranks, a plain local environment.

    Inside a SLURM allocation Lightning would otherwise detect SLURM and expect
    srun to have started one task per device: a one-task job holding several
    GPUs, or a one-process fit inside a multi-task allocation (``--ntasks=2``),
    would be refused.
    """
    plugins: list = [AtomicCheckpointIO()]
    if strategy == "ddp" and SLURMEnvironment.detect():
        # Ranks started by srun (imgpipe.learn.launch); Snakemake resubmits failed jobs, not Lightning.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    else:
        plugins.append(LightningEnvironment())
    return plugins


def checkpoint_loads(path: Path) -> bool:
    """True when ``path`` holds a complete, readable checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure means: do not resume from it
        log.warning("ignoring unreadable resume state %s: %s", path, err)
        return False
    return isinstance(state, dict) and "state_dict" in state and "loops" in state


def resume_point(state_dir: Path) -> tuple[Path | None, int | None]:
    """The last.ckpt to continue from and its epoch, or (None, None) for a fresh start (clearing the state)."""
    last = state_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and checkpoint_loads(last):
        epoch = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
        # A kill between the checkpoint and the logger's write loses the epoch's
        # history rows: start afresh (same result, deterministic) rather than lose them.
        if set(range(epoch + 1)) <= logged_epochs(state_dir / "logs"):
            return last, epoch
        log.warning("resume state %s lacks the history of its epochs: starting afresh", state_dir)
    if state_dir.exists():
        # Every srun-started rank clears a stale state at once: a vanished file is no error.
        shutil.rmtree(state_dir, ignore_errors=True)
    return None, None


def logged_epochs(log_root: Path) -> set[int]:
    """Epochs whose training loss the CSVLogger files of every attempt hold."""
    history = combined_history(log_root)
    if "train_loss" not in history:
        return set()
    return set(history.dropna(subset=["train_loss"])["epoch"].astype(int))


def combined_history(log_root: Path) -> pd.DataFrame:
    """One row per epoch from the CSVLogger files of every attempt; a later attempt's rows win.

    A resumed attempt re-runs every epoch after its checkpoint, so for each
    epoch the latest attempt that logged it has the rows that count.
    """
    frames = []
    versions = sorted(log_root.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    for attempt, path in enumerate(versions):
        try:
            frame = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
            # An attempt killed before (or while) its logger wrote: it holds no usable rows.
            log.warning("ignoring unreadable training log %s: %s", path, err)
            continue
        if frame.empty or "epoch" not in frame:
            continue
        # LearningRateMonitor's rows carry no epoch: they precede the epoch they belong to.
        frame["epoch"] = frame["epoch"].bfill()
        frames.append(frame.dropna(subset=["epoch"]).assign(attempt=attempt))
    if not frames:
        return pd.DataFrame(columns=["epoch", "step", "attempt"])
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[rows["attempt"] == rows.groupby("epoch")["attempt"].transform("max")]
    history = rows.groupby("epoch", sort=True).first()
    history["step"] = rows.groupby("epoch")["step"].max()  # the step count at the epoch's end
    history = history.reset_index()
    lr_columns = sorted(c for c in history.columns if c.startswith("lr-"))
    if lr_columns:
        history = history.rename(columns={lr_columns[0]: "lr"}).drop(columns=lr_columns[1:])
    history["epoch"] = history["epoch"].astype(int)
    first = ["epoch", "step", "train_loss", "val_loss", "val_acc", "lr"]
    ordered = [c for c in first if c in history] + sorted(set(history.columns) - set(first))
    return history[ordered]


# ---------------------------------------------------------------- TensorBoard


def tensorboard_logger(
    tensorboard_dir: str | os.PathLike, resume_from: Path | None
) -> TensorBoardLogger:
    """A TensorBoardLogger writing its event files straight into ``tensorboard_dir`` (one run per job).

    A fresh start clears the folder, so it holds this job's one run. A resumed
    attempt keeps the killed attempt's files and writes on from the
    checkpoint: its writer's ``purge_step`` (the checkpoint's global step)
    makes TensorBoard drop what the killed attempt logged from that step on
    (an epoch's metrics are logged at its last step, global step - 1; the
    next epoch's learning rate at global step), so each step shows once, from
    the attempt that counts. No ``hp_metric``
    placeholder: the hyper-parameters are logged once, with the final metrics
    (:class:`HParamsAtEnd`).
    """
    tensorboard_dir = Path(tensorboard_dir)
    purge_step = None
    if resume_from is None:
        shutil.rmtree(tensorboard_dir, ignore_errors=True)
    else:
        state = torch.load(resume_from, map_location="cpu", weights_only=True, mmap=True)
        purge_step = int(state["global_step"])
    tensorboard_dir.mkdir(parents=True, exist_ok=True)
    return TensorBoardLogger(
        tensorboard_dir, name="", version="", default_hp_metric=False, purge_step=purge_step
    )


def run_hparams(model_cfg: Mapping, train_cfg: Mapping) -> dict[str, Any]:
    """The settings TensorBoard's HParams tab compares: ``model.*`` and ``train.*`` as dotted keys.

    The keys are those of the config (``train.lr``), so a sweep trial's
    overrides appear under their own names; the layout keys (threads,
    devices, loader workers), which decide no result, are left out.
    """
    params: dict[str, Any] = {}
    for section, values in (("model", model_cfg), ("train", train_cfg)):
        for key, value in values.items():
            if section == "train" and key in LAYOUT_KEYS:
                continue
            params[f"{section}.{key}"] = (
                value if isinstance(value, bool | int | float | str) else str(value)
            )
    return params


class HParamsAtEnd(Callback):
    """At the end of training, log the run's hyper-parameters with its final metrics to TensorBoard.

    Metrics: ``hp/best_<monitor>`` (the checkpoint's score, when the run
    validates) and ``hp/train_loss`` (the last epoch's), at the last step;
    Lightning's ``log_hyperparams(params, metrics)``.
    """

    def __init__(self, params: Mapping[str, Any], monitor: str) -> None:
        self.params, self.monitor = dict(params), monitor

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the hyper-parameters and final metrics to every TensorBoardLogger (rank 0)."""
        metrics = {}
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_score", None)
        if checkpoint is not None and checkpoint.monitor and best is not None:
            metrics[f"hp/best_{self.monitor}"] = float(best)
        if "train_loss" in trainer.callback_metrics:
            metrics["hp/train_loss"] = float(trainer.callback_metrics["train_loss"])
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.params, metrics, step=trainer.global_step)
                logger.experiment.flush()


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


@dataclass(frozen=True)
class RunPlan:
    """Where and how a fit runs: accelerator, processes, strategy, precision, threads per rank."""

    on_gpu: bool
    devices: int
    num_nodes: int
    strategy: str
    precision: str
    rank_threads: int

    @property
    def world_size(self) -> int:
        """Processes over all nodes."""
        return self.devices * self.num_nodes


def plan_run(train_cfg: Mapping, devices: int | None, threads: int | None) -> RunPlan:
    """Pick devices, strategy, precision and threads from the config and the job."""
    on_gpu = torch.cuda.is_available()  # NVML-based under Lightning: CUDA stays uninitialised
    n_devices = int(devices or (1 if on_gpu else train_cfg["cpu_devices"]))
    num_nodes = int(train_cfg["num_nodes"])
    total_threads = train_cfg.get("threads") or threads or torch.get_num_threads()
    # CPU ranks share the job's cores; a GPU rank keeps them all for its host work.
    rank_threads = total_threads if on_gpu else max(1, total_threads // n_devices)
    return RunPlan(
        on_gpu=on_gpu,
        devices=n_devices,
        num_nodes=num_nodes,
        strategy=choose_strategy(n_devices * num_nodes, on_gpu),
        precision=resolve_precision(train_cfg["precision"], on_gpu),
        rank_threads=rank_threads,
    )


def monitor_mode(train_cfg: Mapping) -> tuple[str, str]:
    """The monitored metric and whether it is maximised or minimised."""
    monitor = train_cfg["monitor"]
    return monitor, metric_mode(monitor)


def checkpoint_callbacks(folder: Path, monitor: str, mode: str, validate: bool) -> list[Callback]:
    """best.ckpt (the best epoch, when validating) and last.ckpt, rewritten after every epoch.

    Lightning's ``save_last=True`` rewrites last.ckpt only when the same
    callback saved a top-k checkpoint at that step, i.e. when best.ckpt
    improved: a run killed after epochs that did not improve would resume from
    its last improving epoch. A second callback without a monitor keeps its
    one checkpoint, named ``last``, at the latest epoch instead. It comes after
    the best one, so last.ckpt holds the best callback's updated state. Without
    validation the last epoch is the model and last.ckpt is all there is.
    """
    latest = ModelCheckpoint(
        dirpath=folder, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    if not validate:
        return [latest]
    best = ModelCheckpoint(
        dirpath=folder,
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        enable_version_counter=False,
    )
    return [best, latest]


def make_trainer(
    train_cfg: Mapping,
    plan: RunPlan,
    state_dir: Path,
    validate: bool = True,
    tensorboard: TensorBoardLogger | None = None,
    hparams: Mapping[str, Any] | None = None,
) -> pl.Trainer:
    """A Trainer for ``plan`` keeping its checkpoints, logs and run stats in ``state_dir``.

    With ``tensorboard`` it also logs there (beside the CSVLogger that
    history.csv is built from), ending with ``hparams`` and the final metrics.

    Per-step overheads are off (progress bar, model summary, sanity check):
    they cost ~5% of a small CPU model's step time (bench/train.py). Without
    validation (``validate=False``: the final model on the whole training
    pool for a fixed number of epochs) the last epoch is the model.
    """
    monitor, mode = monitor_mode(train_cfg)
    callbacks: list[Callback] = [
        *checkpoint_callbacks(state_dir / "checkpoints", monitor, mode, validate),
        LearningRateMonitor(logging_interval="epoch"),
        TrainingProgress(state_dir / "run-stats.json", plan.rank_threads),
    ]
    patience = train_cfg["early_stopping_patience"]
    if patience > 0 and validate:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience))
    if parse_freeze(train_cfg["freeze"]) != 0:
        callbacks.append(BackboneFreeze(train_cfg["freeze"]))
    loggers: list = [CSVLogger(state_dir, name="logs", flush_logs_every_n_steps=1)]
    if tensorboard is not None:
        loggers.append(tensorboard)
        callbacks.append(HParamsAtEnd(hparams or {}, monitor))
    deterministic = bool(train_cfg["deterministic"])
    return pl.Trainer(
        accelerator="gpu" if plan.on_gpu else "cpu",
        devices=plan.devices,
        num_nodes=plan.num_nodes,
        strategy=trainer_strategy(plan, train_cfg),
        precision=plan.precision,
        max_epochs=train_cfg["max_epochs"],
        callbacks=callbacks,
        logger=loggers,
        # Some CUDA kernels (e.g. scatter-adds) have no deterministic version: warn there, do not stop.
        deterministic=("warn" if plan.on_gpu else True) if deterministic else False,
        benchmark=False if deterministic else None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        log_every_n_steps=50,
        use_distributed_sampler=False,  # the data module shards batches per rank itself
        plugins=trainer_plugins(plan.strategy),
        default_root_dir=state_dir,
    )


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
        state_dir / "checkpoints" / "last.ckpt",
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
        state_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
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


class BackboneFreeze(pl.Callback):
    """``train.freeze`` for a LightningModule whose Classifier is ``pl_module.model``.

    ``backbone``: frozen for the whole fit (a linear probe); an integer N: frozen
    during epochs 0..N-1, trained from epoch N on. The state follows from the
    epoch number alone, so a resumed fit is in the same state as an
    uninterrupted one. Parameters stay in their optimiser groups throughout
    (see :func:`optimizer_groups`), so the learning-rate schedule covers them.
    Under DDP (world size > 1) with an integer freeze, requires_grad is kept and
    the trainer needs ``strategy="ddp_find_unused_parameters_true"``.
    """

    def __init__(self, freeze: str | int | None):
        super().__init__()
        self.unfreeze_at = parse_freeze(freeze)
        self.keep_requires_grad = False

    def _apply(self, pl_module: pl.LightningModule, epoch: int) -> None:
        trainable = self.unfreeze_at is not None and epoch >= self.unfreeze_at
        set_backbone_trainable(
            pl_module.model, trainable, keep_requires_grad=self.keep_requires_grad
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Freeze before the optimisers are made and the model is wrapped for DDP."""
        if stage == "fit" and self.unfreeze_at != 0:
            self.keep_requires_grad = self.unfreeze_at is not None and trainer.world_size > 1
            self._apply(pl_module, 0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unfreeze once the epoch reaches train.freeze."""
        if self.unfreeze_at != 0:
            self._apply(pl_module, trainer.current_epoch)
