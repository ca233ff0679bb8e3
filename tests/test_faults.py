"""Faults: loaded files are read safely, and a DAG killed at any point resumes to the same results."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.workflow_utils import (
    FINISHED_RUN_CONFIG,
    copy_workflow,
    digits_tree,
    fresh_files,
    planned_jobs,
    snakemake,
    start_snakemake,
    tmp_leftovers,
    write_config,
)

from imgpipe.core.errors import DataError
from imgpipe.data.dataset import load_images
from imgpipe.infer.inference import load_classifier
from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.trainer import (
    AtomicCheckpointIO,
    checkpoint_loads,
    logged_epochs,
    resumable_checkpoint,
    resume_point,
)


class Payload:
    """An object whose unpickling would run code (here: record that it ran)."""

    ran = False

    def __reduce__(self):
        return (Payload._mark, ())

    @staticmethod
    def _mark():
        Payload.ran = True
        return "ran"


def small_checkpoint(extra: object | None = None) -> dict:
    """A real checkpoint of a tiny classifier, optionally holding a pickled object."""
    module = ImageClassifier(
        {"name": "smallcnn", "channels": [4], "dropout": 0.0},
        {"lr": 0.01},
        num_classes=2,
        in_channels=1,
        image_size=8,
        mean=[0.5],
        std=[0.25],
    )
    state = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "epoch": 0,
        "loops": {},
    }
    if extra is not None:
        state["extra"] = extra
    return state


def test_clean_checkpoint_loads(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(small_checkpoint(), path)
    module = load_classifier(path)
    assert module.model.head.out_features == 2


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(small_checkpoint(extra=Payload()), path)
    Payload.ran = False
    with pytest.raises(DataError, match="pickled Python object .* could run code"):
        load_classifier(path)
    assert not Payload.ran


def test_resume_state_with_pickled_object_is_not_resumed(tmp_path):
    state_dir = tmp_path / "state"
    last = state_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save(small_checkpoint(extra=Payload()), last)
    Payload.ran = False
    assert not checkpoint_loads(last)
    assert resume_point(state_dir) == (None, None)
    assert not state_dir.exists() and not Payload.ran


def test_truncated_resume_state_starts_afresh(tmp_path):
    state_dir = tmp_path / "state"
    last = state_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save(small_checkpoint(), last)
    last.write_bytes(last.read_bytes()[:200])
    assert resume_point(state_dir) == (None, None)
    assert not state_dir.exists()


def test_saving_last_checkpoint_keeps_the_one_it_replaces(tmp_path):
    last = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({**small_checkpoint(), "epoch": 0}, last)
    io.save_checkpoint({**small_checkpoint(), "epoch": 1}, last)
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "previous.ckpt", weights_only=True)["epoch"] == 0
    # Other checkpoints (best.ckpt) are simply replaced.
    io.save_checkpoint(small_checkpoint(), tmp_path / "best.ckpt")
    io.save_checkpoint(small_checkpoint(), tmp_path / "best.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt", "previous.ckpt"]


def test_kill_between_checkpoint_and_history_resumes_from_the_epoch_before(tmp_path):
    # last.ckpt (epoch 2) is on disk, but the kill came before epoch 2's
    # training loss reached the history: continue from previous.ckpt (epoch 1).
    state_dir = tmp_path / "state"
    checkpoints = state_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({**small_checkpoint(), "epoch": 1}, checkpoints / "previous.ckpt")
    torch.save({**small_checkpoint(), "epoch": 2}, checkpoints / "last.ckpt")
    (state_dir / "logs" / "version_0").mkdir(parents=True)
    history = pd.DataFrame(
        {
            "epoch": [0, 0, 1, 1, 2],
            "step": [3, 3, 7, 7, 11],
            "val_loss": [0.9, None, 0.8, None, 0.7],
            "train_loss": [None, 1.0, None, 0.9, None],
        }
    )
    history.to_csv(state_dir / "logs" / "version_0" / "metrics.csv", index=False)
    assert logged_epochs(state_dir / "logs") == {0, 1}
    assert resumable_checkpoint(state_dir) == (checkpoints / "previous.ckpt", 1)
    assert resume_point(state_dir) == (checkpoints / "previous.ckpt", 1)
    assert (checkpoints / "previous.ckpt").is_file(), "the state it resumes from is kept"


def shard_index(array_path, rows) -> pd.DataFrame:
    """A minimal clean index pointing at ``rows`` of one shard array."""
    n = len(rows)
    return pd.DataFrame(
        {
            "id": range(n),
            "path": [f"x/{i}.png" for i in range(n)],
            "relpath": [f"{i}.png" for i in range(n)],
            "label": ["a"] * n,
            "source": ["train"] * n,
            "sha256": ["0"] * n,
            "group": range(n),
            "near_group": range(n),
            "shard": [0] * n,
            "row": rows,
            "array": [str(array_path)] * n,
        }
    )


def test_object_array_is_refused(tmp_path):
    path = tmp_path / "images.npy"
    objects = np.empty((2, 4, 4, 1), dtype=object)
    objects[...] = Payload()
    np.save(path, objects, allow_pickle=True)
    Payload.ran = False
    with pytest.raises(ValueError):
        load_images(shard_index(path, [0, 1]))
    assert not Payload.ran


def test_non_uint8_array_is_refused_not_cast(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.full((2, 4, 4, 1), 300.0))
    with pytest.raises(ValueError, match="uint8"):
        load_images(shard_index(path, [1, 0]))


def test_uint8_shard_rows_gathered_in_index_order(tmp_path):
    path = tmp_path / "images.npy"
    shard = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1)
    np.save(path, shard)
    np.testing.assert_array_equal(load_images(shard_index(path, [2, 0])), shard[[2, 0]])


# ---------------------------------------------------------------- resume is bit-identical


def fit_digits(out_dir, resume_dir=None, max_epochs=3, random=True):
    """Fit a tiny CNN on 3 digit classes (dropout and online augmentation on when ``random``)."""
    from imgpipe.learn.fit import fit
    from imgpipe.stages.demo import digits_images

    images, labels = digits_images()
    keep = np.flatnonzero(labels < 3)[:90]
    images, labels = images[keep][..., None], labels[keep]
    ids = np.arange(len(labels))
    train_cfg = {
        "max_epochs": max_epochs,
        "min_steps": 0,
        "batch_size": 16,
        "lr": 0.01,
        "schedule": "onecycle",
        "early_stopping_patience": 0,
        "seed": 3,
        "deterministic": True,
        "threads": 1,
    }
    model_cfg = {"name": "smallcnn", "channels": [4, 8], "dropout": 0.3 if random else 0.0}
    return fit(
        images,
        labels,
        ids,
        ids[:0],  # no validation: model.ckpt is the last epoch
        None,
        None,
        model_cfg,
        train_cfg,
        out_dir,
        resume_dir=resume_dir,
        augment_cfg={"on_device": random, "hflip": True, "translate": 0.2},
    )


@pytest.mark.parametrize("random", [False, True])
def test_resumed_training_is_bit_identical(tmp_path, monkeypatch, random):
    fit_digits(tmp_path / "straight", random=random)
    original = ImageClassifier.on_train_epoch_start

    def killed_at_epoch_one(self):
        if self.current_epoch == 1:
            raise RuntimeError("killed")  # as a kill after epoch 0's last.ckpt
        original(self)

    state = tmp_path / "state"
    monkeypatch.setattr(ImageClassifier, "on_train_epoch_start", killed_at_epoch_one)
    with pytest.raises(RuntimeError, match="killed"):
        fit_digits(tmp_path / "resumed", resume_dir=state, random=random)
    assert (state / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.setattr(ImageClassifier, "on_train_epoch_start", original)
    summary = fit_digits(tmp_path / "resumed", resume_dir=state, random=random)
    assert summary["resumed_from_epoch"] == 0 and summary["attempts"] == 2
    assert not state.exists()
    straight = torch.load(tmp_path / "straight" / "model.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "model.ckpt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"]
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    history = [pd.read_csv(tmp_path / d / "history.csv") for d in ("straight", "resumed")]
    cols = ["epoch", "step", "train_loss"]
    pd.testing.assert_frame_equal(history[0][cols], history[1][cols])


# ---------------------------------------------------------------- crash consistency, end to end

COMPARED = [
    "results/clean/index.csv",
    "results/split/split.csv",
    "results/evaluate/metrics.json",
    "results/cv/summary.csv",
    "results/cluster/pixels/assignments.csv",
    "results/cluster/embeddings/assignments.csv",
]


def kill_points(workdir: Path):
    """(name, rule killed, test) in DAG order; a test says the point is reached since ``t`` ns."""

    def fresh(pattern):
        return lambda t: bool(fresh_files(workdir, pattern, t))

    def training(log_pattern, output_pattern, state_pattern):
        # Mid-training: a job of this rule started, has not finished, and its own resume
        # state (.imgpipe/resume/<job>-<key>: other training jobs may run beside it) holds a
        # checkpoint written since we first saw its log, with that epoch's history on disk
        # (a kill between the two is rightly not resumed, so it would test nothing).
        first_seen: dict[int, int] = {}

        def reached(t):
            logs = fresh_files(workdir, log_pattern, t)
            if len(logs) <= len(fresh_files(workdir, output_pattern, t)):
                return False
            start = first_seen.setdefault(t, time.time_ns())
            checkpoints = fresh_files(workdir, f"{state_pattern}/checkpoints/last.ckpt", start)
            return any(resumable(path.parent.parent) for path in checkpoints)

        return reached

    return [
        ("during ingest", "ingest_shard", fresh("logs/ingest/shard-*.log")),
        (
            "mid-training, a sweep trial",
            "sweep_trial",
            training(
                "logs/sweep/lr~*.log",
                "results/sweep/trials/*/summary.json",
                ".imgpipe/resume/sweep-*",
            ),
        ),
        (
            "mid-training, the final model",
            "train_final",
            training(
                "logs/train/final.log",
                "results/train/final/summary.json",
                ".imgpipe/resume/final-*",
            ),
        ),
        ("during clustering", "cluster", fresh("logs/cluster/*.log")),
        ("during the report", "report", fresh("logs/report.log")),
    ]


def resumable(state_dir: Path) -> bool:
    """Whether a resume folder holds a checkpoint whose epochs are all in the logged history."""
    try:
        return resumable_checkpoint(state_dir)[0] is not None
    except Exception:  # being written, or removed after success: not (yet) resumable
        return False


def run_until(workdir: Path, reached, timeout: float = 600) -> bool:
    """Run snakemake --rerun-incomplete; SIGKILL its process group once ``reached``. True if killed."""
    since = time.time_ns()
    proc = start_snakemake(workdir, "--rerun-incomplete")
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if reached(since):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.02)
        assert proc.poll() is not None, "snakemake did not finish in time"
        if proc.returncode != 0:
            logs = sorted((workdir / ".snakemake" / "log").glob("*.log"))
            raise AssertionError(f"snakemake failed:\n{logs[-1].read_text()[-3000:]}")
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def comparable(workdir: Path) -> dict[str, bytes]:
    """The outputs a kill must not change (trials.csv without its timing column).

    Image paths are absolute: the copy's own folder is replaced by a placeholder.
    """
    files = {name: (workdir / name).read_bytes() for name in COMPARED}
    trials = pd.read_csv(workdir / "results/sweep/trials.csv").drop(columns="seconds")
    files["results/sweep/trials.csv"] = trials.to_csv(index=False).encode()
    here = str(workdir.resolve()).encode()
    return {name: data.replace(here, b"<workdir>") for name, data in files.items()}


@pytest.mark.slow
def test_killed_runs_resume_to_identical_results(finished_run, tmp_path):
    # The reference: the session's finished run, made from the same data and config.
    expected = comparable(finished_run)
    crashed = copy_workflow(tmp_path / "crashed")
    digits_tree(crashed / "data")
    write_config(crashed, FINISHED_RUN_CONFIG)

    survived = []
    for name, rule, reached in kill_points(crashed):
        if not run_until(crashed, reached):
            break  # the run completed before this point (a loaded machine can race past it)
        survived.append(name)
        snakemake(crashed, "--unlock")
        # A killed job's outputs are never taken as complete: the job is planned again.
        assert planned_jobs(crashed, "--rerun-incomplete")[rule] >= 1, (name, rule)
    else:
        assert not run_until(crashed, lambda t: False)
    assert {"during ingest", "mid-training, the final model"} <= set(survived), survived
    assert not planned_jobs(crashed), "a complete run leaves nothing to do"

    assert comparable(crashed) == expected
    final = json.loads((crashed / "results/train/final/summary.json").read_text())
    assert final["resumed_from_epoch"] is not None, "the final model did not resume"
    assert not any((crashed / ".imgpipe").rglob("*.ckpt")), "stale resume state"
    assert list((crashed / ".imgpipe" / "resume").iterdir()) == []
    assert tmp_leftovers(crashed / "results") == []
    assert not list((crashed / "results").rglob(".fit-*"))


def resume_state(state_dir, first_metrics: str):
    """A resume folder holding an epoch-0 last.ckpt and the first attempt's metrics.csv."""
    last = state_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save(small_checkpoint(), last)
    metrics = state_dir / "logs" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(first_metrics)
    return last


def test_resume_state_without_its_history_starts_afresh(tmp_path):
    # A kill after last.ckpt but before the CSVLogger wrote leaves an empty metrics.csv.
    state_dir = tmp_path / "state"
    resume_state(state_dir, "")
    assert resume_point(state_dir) == (None, None)
    assert not state_dir.exists()


def test_resume_state_with_its_history_resumes(tmp_path):
    state_dir = tmp_path / "state"
    last = resume_state(state_dir, "epoch,step,train_loss\n0,3,1.2\n")
    (state_dir / "logs" / "version_1").mkdir()
    (state_dir / "logs" / "version_1" / "metrics.csv").write_text("")  # killed attempt
    assert resume_point(state_dir) == (last, 0)


def test_stale_temp_files_of_an_interrupted_attempt_are_removed(tmp_path):
    from imgpipe.core.atomic import write_text
    from imgpipe.learn.trainer import save_torch

    stale = [tmp_path / ".a.csv.0123.tmp.csv", tmp_path / ".model.ckpt.x1y2.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    keep = tmp_path / ".other.csv.9.tmp"
    keep.write_bytes(b"another output's")
    write_text("x\n", tmp_path / "a.csv")
    save_torch({"a": 1}, tmp_path / "model.ckpt")
    assert not any(p.exists() for p in stale) and keep.exists()
    assert (tmp_path / "a.csv").read_text() == "x\n"
