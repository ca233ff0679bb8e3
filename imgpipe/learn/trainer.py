"""The Lightning Trainer of a run, configured from its plan: precision, strategy, plugins,
checkpoints and resume, callbacks, TensorBoard, the history of every epoch logged."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from imgpipe.core.atomic import write_stream
from imgpipe.learn.gpus import gpu_supports_bf16
from imgpipe.learn.monitor import metric_mode
from imgpipe.learn.param_groups import parse_freeze, set_backbone_trainable
from imgpipe.learn.progress_callback import TrainingProgress
from imgpipe.learn.training_run import LAUNCHED_VAR
from imgpipe.workflow.config import LAYOUT_KEYS

log = logging.getLogger("imgpipe")

# The latest epoch's checkpoint and the one it replaced (see AtomicCheckpointIO).
LAST_CHECKPOINT = "last.ckpt"
PREVIOUS_CHECKPOINT = "previous.ckpt"


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
        """Save ``checkpoint`` to ``path`` atomically; the replaced last.ckpt becomes previous.ckpt."""
        path = Path(path)
        if path.name == LAST_CHECKPOINT and path.is_file():
            # last.ckpt is written before the epoch's training loss reaches the
            # CSV history: a kill in between leaves a last.ckpt that cannot be
            # resumed, and the epoch before it is what a rerun continues from.
            os.replace(path, path.with_name(PREVIOUS_CHECKPOINT))
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


def read_resume_state(path: Path) -> dict | None:
    """The checkpoint at ``path`` when it is complete and readable (weights only), else None."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure means: do not resume from it
        log.warning("ignoring unreadable resume state %s: %s", path, err)
        return None
    return state if isinstance(state, dict) and "state_dict" in state and "loops" in state else None


def checkpoint_loads(path: Path) -> bool:
    """True when ``path`` holds a complete, readable checkpoint."""
    return read_resume_state(path) is not None


def resumable_checkpoint(state_dir: Path) -> tuple[Path | None, int | None]:
    """The newest of last.ckpt and previous.ckpt that loads and whose epochs are all logged, and its epoch."""
    logged = logged_epochs(state_dir / "logs")
    for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = state_dir / "checkpoints" / name
        state = read_resume_state(path) if path.is_file() else None
        if state is None:
            continue
        epoch = int(state["epoch"])
        # A kill between the checkpoint and the logger's write loses the
        # epoch's history rows: such a state is not resumed (that would lose them).
        if set(range(epoch + 1)) <= logged:
            return path, epoch
        log.warning("resume state %s lacks the history of its epochs", path)
    return None, None


def resume_point(state_dir: Path) -> tuple[Path | None, int | None]:
    """The checkpoint to continue from and its epoch, or (None, None) for a fresh start (clearing the state)."""
    path, epoch = resumable_checkpoint(state_dir)
    if path is not None:
        return path, epoch
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
