"""Training with Lightning: outputs, checkpoint round trip, DDP on the CPU, resume after a kill, determinism."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fit_on

from imgpipe.core.errors import DataError
from imgpipe.infer.inference import embed, predict_proba
from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.image_datamodule import IndexBatches
from imgpipe.learn.jobs import input_stamp, job_key
from imgpipe.learn.trainer import combined_history, resumable_checkpoint

# Lightning hints that fit's settings make moot (fit filters them outside pytest too).
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(srun|LeafSpec|logging interval|on_after_batch_transfer|all_gather is deprecated)"
)
ROOT = Path(__file__).resolve().parents[1]
TRAIN_IDS = np.arange(0, 400)
VAL_IDS = np.arange(400, 500)


@pytest.fixture
def train3(tiny_train):
    """The tiny train section for three epochs."""
    return {**tiny_train, "max_epochs": 3}


def shifted_copies(images, ids):
    """Augmented views (one pixel shift) of ``ids`` and their source ids."""
    return np.roll(images[ids], 1, axis=2), np.asarray(ids)


def test_fit_writes_outputs_and_checkpoint_predicts(digits16, tmp_path, tiny_model, train3):
    images, labels = digits16
    # Copies of training AND validation images: only the training ones may be used.
    views = shifted_copies(images, np.arange(0, 500, 2))
    summary = fit_on(digits16, TRAIN_IDS, VAL_IDS, tiny_model, train3, tmp_path, views=views)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "history.csv",
        "model.ckpt",
        "summary.json",
    ]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["augmented_images"] == 200
    assert summary["train_images"] == 400 and summary["val_images"] == 100
    assert summary["epochs"] == 3 and summary["world_size"] == 1
    assert summary["precision"] == "32-true" and summary["accelerator"] == "cpu"
    assert summary["images_per_s"] > 0
    # 600 training images in batches of 32, ragged batch dropped: 18 batches x 32 per epoch.
    assert summary["samples_per_rank"] == [3 * 18 * 32]

    history = pd.read_csv(tmp_path / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    for column in ("train_loss", "val_loss", "val_acc", "lr"):
        assert history[column].notna().all(), column
    assert summary["best_score"] == pytest.approx(history["val_acc"].max())
    # The score is the last epoch's (end of the schedule); the schedule as run is logged.
    assert summary["score"] == pytest.approx(history["val_acc"].iloc[-1])
    assert summary["batch_size"] == 32 and summary["steps_per_epoch"] == 18
    assert summary["steps"] == 3 * 18 and summary["scheduled_epochs"] == 3

    # The model kept is the last epoch's, whichever epoch validated best.
    state = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == summary["model_epoch"] == 2
    assert "optimizer_states" not in state

    proba = predict_proba(tmp_path / "model.ckpt", images[VAL_IDS], batch_size=33)
    assert proba.shape == (100, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    # The saved model is the last epoch's: it reproduces that epoch's validation accuracy.
    accuracy = (proba.argmax(axis=1) == labels[VAL_IDS]).mean()
    assert accuracy == pytest.approx(summary["score"], abs=1e-6)
    assert accuracy > 0.3  # chance is 0.1
    features = embed(tmp_path / "model.ckpt", images[:7])
    assert features.shape == (7, 16)
    assert embed(tmp_path / "model.ckpt", images[:0]).shape == (0, 16)


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": "sgd", "schedule": "cosine", "l1": 1e-5},
        {"schedule": "none", "monitor": "val_loss", "optimizer": "sgd", "momentum": 0.0},
    ],
)
def test_other_optimisers_schedules_and_monitors_train(
    digits16, tmp_path, changes, tiny_model, train3
):
    images, labels = digits16
    train_cfg = {**train3, "max_epochs": 2, **changes}
    summary = fit_on((images, labels), TRAIN_IDS, VAL_IDS, tiny_model, train_cfg, tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    monitor = train_cfg["monitor"]
    best = history[monitor].max() if monitor == "val_acc" else history[monitor].min()
    assert summary["monitor"] == monitor and summary["best_score"] == pytest.approx(best)
    if changes["schedule"] == "none":
        assert history["lr"].nunique() == 1
    else:
        assert history["lr"].iloc[-1] < history["lr"].iloc[0]


@pytest.mark.parametrize("inside_slurm", [False, True])
def test_ddp_on_two_cpu_processes(
    digits16, tmp_path, monkeypatch, inside_slurm, tiny_model, train3
):
    images, labels = digits16
    if inside_slurm:
        # A one-task SLURM job: fit starts both ranks itself instead of expecting srun to.
        for key, value in {
            "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_JOB_NAME": "train",
            "SLURM_NNODES": "1",
        }.items():
            monkeypatch.setenv(key, value)
    summary = fit_on(
        (images, labels),
        TRAIN_IDS,
        VAL_IDS,
        tiny_model,
        {**train3, "max_epochs": 2, "threads": 2},
        tmp_path,
        devices=2,
    )
    assert summary["strategy"] == "ddp_fork"
    assert summary["world_size"] == 2
    # Both ranks trained, on equal shares: 400 images -> 200 per rank -> 6 batches of 32 per epoch.
    assert summary["samples_per_rank"] == [2 * 6 * 32, 2 * 6 * 32]
    proba = predict_proba(tmp_path / "model.ckpt", images[VAL_IDS])
    accuracy = (proba.argmax(axis=1) == labels[VAL_IDS]).mean()
    # Validation is sharded over the ranks without padding: the synced metric is exact.
    assert accuracy == pytest.approx(summary["score"], abs=1e-6)


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import cv2, numpy as np
    from imgpipe.stages.demo import digits_images
    from imgpipe.learn.fit import fit
    images, labels = digits_images()
    images = np.stack([cv2.resize(im, (16, 16)) for im in images])[:, :, :, None]
    model_cfg, train_cfg = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    fit(images, labels, np.arange(0, 1400), np.arange(1400, 1797), None, None,
        model_cfg, train_cfg, sys.argv[3], resume_dir=sys.argv[4])
    """
)


def run_resume_script(tmp_path, train_cfg, out_dir, resume_dir, tiny_model):
    script = tmp_path / "train_job.py"
    script.write_text(RESUME_SCRIPT)
    args = [json.dumps(tiny_model), json.dumps(train_cfg), str(out_dir), str(resume_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=tmp_path)


def resumable_epoch(resume_dir):
    """The epoch a rerun would continue from (imgpipe.learn.trainer.resumable_checkpoint), or None."""
    try:
        return resumable_checkpoint(resume_dir)[1]
    except Exception:  # being written: try again
        return None


def test_resume_after_kill_continues_from_last_checkpoint(tmp_path, tiny_model, train3):
    train_cfg = {**train3, "max_epochs": 6}
    out_dir, resume_dir = tmp_path / "out", tmp_path / "resume"
    job = run_resume_script(tmp_path, train_cfg, out_dir, resume_dir, tiny_model)
    deadline = time.monotonic() + 240
    # Kill once a checkpoint AND its epochs' history are on disk: a state whose
    # history the kill cut short is (rightly) discarded, not resumed.
    while (
        resumable_epoch(resume_dir) is None and job.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    assert not (out_dir / "summary.json").exists()
    # last.ckpt, or previous.ckpt when the kill came between last.ckpt and its history.
    killed_at = resumable_epoch(resume_dir)
    assert killed_at is not None and killed_at < 5

    rerun = run_resume_script(tmp_path, train_cfg, out_dir, resume_dir, tiny_model)
    assert rerun.wait(timeout=600) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == killed_at
    assert summary["attempts"] == 2
    history = pd.read_csv(out_dir / "history.csv")
    # Every epoch once; those up to the checkpoint come from the killed attempt (not redone).
    assert history["epoch"].tolist() == list(range(6))
    assert (history.loc[history["epoch"] <= killed_at, "attempt"] == 0).all()
    assert (history.loc[history["epoch"] > killed_at, "attempt"] == 1).all()
    assert not resume_dir.exists(), "the resume state is removed after success"


def test_failed_fit_leaves_no_private_state(digits16, tmp_path, monkeypatch, tiny_model, train3):
    images, labels = digits16

    def broken_step(self, batch, batch_idx):
        raise RuntimeError("boom")

    monkeypatch.setattr(ImageClassifier, "training_step", broken_step)
    with pytest.raises(RuntimeError, match="boom"):
        fit_on((images, labels), TRAIN_IDS, VAL_IDS, tiny_model, train3, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_resume_state_starts_over(digits16, tmp_path, tiny_model, train3):
    images, labels = digits16
    resume_dir = tmp_path / "resume"
    (resume_dir / "checkpoints").mkdir(parents=True)
    (resume_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated by a kill")
    summary = fit_on(
        (images, labels),
        TRAIN_IDS,
        VAL_IDS,
        tiny_model,
        {**train3, "max_epochs": 1},
        tmp_path / "out",
        resume_dir=resume_dir,
    )
    assert summary["resumed_from_epoch"] is None
    assert summary["epochs"] == 1
    assert not resume_dir.exists()


def test_same_seed_same_metrics(digits16, tmp_path, tiny_model, train3):
    images, labels = digits16
    train_cfg = {**train3, "max_epochs": 2, "deterministic": True}
    aug_images, aug_sources = shifted_copies(images, TRAIN_IDS[:100])
    histories = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        views = (aug_images, aug_sources)
        cfg = {**train_cfg, "seed": seed}
        fit_on(digits16, TRAIN_IDS, VAL_IDS, tiny_model, cfg, tmp_path / run, views=views)
        histories.append(pd.read_csv(tmp_path / run / "history.csv"))
    columns = ["train_loss", "val_loss", "val_acc"]
    pd.testing.assert_frame_equal(histories[0][columns], histories[1][columns], check_exact=True)
    assert not np.array_equal(histories[2]["train_loss"], histories[0]["train_loss"])


def test_fit_without_validation_trains_all_epochs_and_keeps_the_last(
    digits16, tmp_path, tiny_model, train3
):
    images, labels = digits16
    # The final model: the whole pool, a fixed number of epochs, no early stopping.
    train = {**train3, "max_epochs": 2, "early_stopping_patience": 3}
    summary = fit_on((images, labels), np.arange(500), [], tiny_model, train, tmp_path)
    assert summary["epochs"] == 2 and summary["model_epoch"] == 1
    assert summary["best_epoch"] is None  # nothing validated, nothing picked
    assert summary["val_images"] == 0
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["epoch"].tolist() == [0, 1]
    probs = predict_proba(tmp_path / "model.ckpt", images[:50])
    # Two epochs of a tiny model: well above chance (0.1), not yet good.
    assert (probs.argmax(axis=1) == labels[:50]).mean() > 0.25


@pytest.mark.parametrize(
    ("train_ids", "val_ids", "message"),
    [
        (np.arange(0), np.arange(10), "no training images"),
        (np.arange(20), np.arange(10, 30), "both in the training and the validation"),
        (np.arange(10), np.arange(10, 20), "single class"),
        (np.arange(10), np.arange(10, 20) + 10_000, "outside"),
    ],
)
def test_ids_that_cannot_train_raise_data_error(
    tmp_path, train_ids, val_ids, message, tiny_model, train3
):
    images = np.zeros((40, 8, 8, 1), dtype=np.uint8)
    labels = np.repeat([0, 1], 20)
    with pytest.raises(DataError, match=message):
        fit_on((images, labels), train_ids, val_ids, tiny_model, train3, tmp_path)


def test_resume_key_follows_params_and_inputs(tmp_path):
    # The key that names a job's resume state (imgpipe.learn.jobs, used by every training rule).
    data = tmp_path / "index.csv"
    data.write_text("id\n0\n")

    def key(lr):
        return job_key("final", {"train": {"lr": lr}}, input_stamp([str(data)]))

    first = key(0.01)
    assert first == key(0.01)
    assert first != key(0.02)
    data.write_text("id\n0\n1\n")
    assert first != key(0.01)


def test_combined_history_takes_each_epoch_from_its_latest_attempt(tmp_path):
    first = tmp_path / "version_0"
    second = tmp_path / "version_1"
    first.mkdir()
    second.mkdir()
    # Attempt 0 ran epochs 0-2 (2 only partly) before the kill; attempt 1 resumed after epoch 1.
    (first / "metrics.csv").write_text(
        "epoch,lr-AdamW/pg1,lr-AdamW/pg2,step,train_loss,val_acc,val_loss\n"
        ",0.1,0.1,0,,,\n0,,,9,,0.5,1.5\n0,,,9,2.0,,\n"
        ",0.2,0.2,10,,,\n1,,,19,,0.6,1.2\n1,,,19,1.5,,\n"
        ",0.3,0.3,20,,,\n2,,,29,,0.1,9.9\n"
    )
    (second / "metrics.csv").write_text(
        "epoch,lr-AdamW/pg1,lr-AdamW/pg2,step,train_loss,val_acc,val_loss\n"
        ",0.3,0.3,20,,,\n2,,,29,,0.7,1.0\n2,,,29,1.2,,\n"
    )
    history = combined_history(tmp_path)
    assert history.columns[:6].tolist() == [
        "epoch",
        "step",
        "train_loss",
        "val_loss",
        "val_acc",
        "lr",
    ]
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["step"].tolist() == [9, 19, 29]
    assert history["val_acc"].tolist() == [0.5, 0.6, 0.7]
    assert history["train_loss"].tolist() == [2.0, 1.5, 1.2]
    assert history["lr"].tolist() == [0.1, 0.2, 0.3]
    assert history["attempt"].tolist() == [0, 0, 1]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_index_batches_shard_and_shuffle(world_size):
    n, batch = 23, 4
    train = [
        IndexBatches(n, batch, True, seed=5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    shards = [torch.cat(list(s)) for s in train]
    assert len({len(s) for s in shards}) == 1  # equal steps on every rank
    assert set(torch.cat(shards).tolist()) == set(range(n))
    assert [len(list(s)) for s in train] == [len(s) for s in train]
    evaluation = [
        IndexBatches(n, batch, False, rank=r, world_size=world_size) for r in range(world_size)
    ]
    assert sorted(torch.cat([torch.cat(list(s)) for s in evaluation]).tolist()) == list(range(n))
    assert [len(list(s)) for s in evaluation] == [len(s) for s in evaluation]
    sampler = train[0]
    epoch0 = torch.cat(list(sampler))
    sampler.set_epoch(1)
    assert not torch.equal(epoch0, torch.cat(list(sampler)))
    sampler.set_epoch(0)
    assert torch.equal(epoch0, torch.cat(list(sampler)))
    dropping = IndexBatches(n, batch, True, drop_last=True)
    assert all(len(b) == batch for b in dropping) and len(dropping) == n // batch


def test_augmentation_runs_on_the_device_for_training_batches_only(tiny_model, tiny_train):
    module = ImageClassifier(
        tiny_model,
        tiny_train,
        num_classes=2,
        in_channels=1,
        image_size=9,
        mean=[0.0],
        std=[1.0],
        augment_cfg={"on_device": True, "rotation": 40.0, "translate": 0.2},
    )
    x = torch.zeros(8, 1, 9, 9, dtype=torch.uint8)
    x[:, 0, 4, 2:7] = 255
    torch.manual_seed(0)
    augmented = module.preprocess(x, augment=True)
    plain = module.preprocess(x, augment=False)
    assert torch.equal(plain, x.float() / 255)
    assert not torch.equal(augmented, plain)
    assert len({tuple(v.flatten().tolist()) for v in augmented}) == 8  # one draw per image
    module.augment_cfg["on_device"] = False
    assert torch.equal(module.preprocess(x, augment=True), plain)


# ----------------------------------------------------------------------------- TensorBoard


def tensorboard_run(folder):
    """A TensorBoard run read back with tensorboard's own event reader."""
    from tensorboard.backend.event_processing import event_accumulator

    run = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    run.Reload()
    return run


def tensorboard_scalars(folder):
    """{tag: [(step, value), ...]} of a TensorBoard run."""
    run = tensorboard_run(folder)
    return {t: [(e.step, e.value) for e in run.Scalars(t)] for t in run.Tags()["scalars"]}


def tensorboard_hparams(folder):
    """({hyper-parameter: value}, {metric tag}) as TensorBoard's HParams tab reads them."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = tensorboard_run(folder).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    hparams = {
        name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()
    }
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    return hparams, {info.name.tag for info in experiment.experiment.metric_infos}


def test_fit_logs_to_tensorboard_with_hparams_and_prints_epoch_lines(
    digits16, tmp_path, tiny_model, train3, caplog
):
    images, labels = digits16
    board = tmp_path / "tensorboard" / "sweep" / "lr~0.02"
    board.mkdir(parents=True)
    (board / "events.out.tfevents.0.stale").write_bytes(b"an earlier run's file")
    train_cfg = {**train3, "lr": 0.02}
    with caplog.at_level("INFO", logger="imgpipe"):
        summary = fit_on(
            digits16,
            TRAIN_IDS,
            VAL_IDS,
            tiny_model,
            train_cfg,
            tmp_path / "out",
            tensorboard_dir=board,
        )
    # A fresh start clears the folder: one run, this job's.
    events = sorted(p.name for p in board.glob("events.out.tfevents.*"))
    assert len(events) == 1 and "stale" not in events[0]
    # The outputs are as without TensorBoard.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "history.csv",
        "model.ckpt",
        "summary.json",
    ]
    scalars = tensorboard_scalars(board)
    hparams, metrics = tensorboard_hparams(board)
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    for tag in ("train_loss", "val_loss", "val_acc"):
        assert [round(v, 5) for _, v in scalars[tag]] == [round(v, 5) for v in history[tag]]
        assert [s for s, _ in scalars[tag]] == history["step"].tolist()
    assert hparams["train.lr"] == pytest.approx(0.02)
    assert hparams["train.max_epochs"] == 3
    assert hparams["model.name"] == "smallcnn"
    assert not any(name.endswith(("threads", "num_workers")) for name in hparams)
    assert metrics == {"hp/best_val_acc", "hp/train_loss"}
    assert scalars["hp/best_val_acc"][0][1] == pytest.approx(summary["best_score"])
    assert "hp_metric" not in scalars  # no placeholder metric

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for line in lines:
        assert "train_loss" in line and "val_acc" in line and "images/s" in line
        assert line.endswith(" left")
    assert lines[-1].endswith("; 0 s left")


KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import cv2, numpy as np
    from imgpipe.stages.demo import digits_images
    from imgpipe.learn.progress_callback import TrainingProgress
    from imgpipe.learn.fit import fit

    die_at = int(os.environ.get("DIE_AT_EPOCH", "-1"))
    start = TrainingProgress.on_train_epoch_start

    def on_train_epoch_start(self, trainer, module):
        start(self, trainer, module)
        if trainer.current_epoch == die_at:
            for logger in trainer.loggers:
                logger.save()  # the writer's periodic flush came just before the kill
            os._exit(9)  # a kill: nothing else is flushed or cleaned up

    TrainingProgress.on_train_epoch_start = on_train_epoch_start
    images, labels = digits_images()
    images = np.stack([cv2.resize(im, (16, 16)) for im in images[:500]])[:, :, :, None]
    model_cfg, train_cfg = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    fit(images, labels[:500], np.arange(0, 400), np.arange(400, 500), None, None,
        model_cfg, train_cfg, sys.argv[3], resume_dir=sys.argv[4], tensorboard_dir=sys.argv[5])
    """
)


def test_resumed_training_continues_its_tensorboard_run(tmp_path, tiny_model, train3):
    script = tmp_path / "kill_job.py"
    script.write_text(KILL_SCRIPT)
    board, resume_dir = tmp_path / "board", tmp_path / "resume"
    args = [
        sys.executable,
        str(script),
        json.dumps(tiny_model),
        json.dumps({**train3, "max_epochs": 4}),
        str(tmp_path / "out"),
        str(resume_dir),
        str(board),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Killed as epoch 3 starts: epochs 1-2 and their checkpoint done, epoch 3's learning rate logged.
    killed = subprocess.run(args, env={**env, "DIE_AT_EPOCH": "2"}, cwd=tmp_path, check=False)
    assert killed.returncode == 9
    checkpoint = torch.load(resume_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1
    first = list(board.glob("events.out.tfevents.*"))
    assert len(first) == 1
    # The killed attempt logged beyond its checkpoint: that is what the resumed one must replace.
    logged = [step for values in tensorboard_scalars(board).values() for step, _ in values]
    assert max(logged) >= checkpoint["global_step"]

    subprocess.run(args, env=env, cwd=tmp_path, check=True)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1
    assert len(list(board.glob("events.out.tfevents.*"))) == 2  # one file per attempt, one run
    scalars = tensorboard_scalars(board)
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    for tag, values in scalars.items():
        steps = [step for step, _ in values]
        if tag != "epoch":  # Lightning logs "epoch" twice per epoch
            assert steps == sorted(set(steps)), f"{tag}: a step logged twice: {steps}"
    assert [s for s, _ in scalars["train_loss"]] == history["step"].tolist()
    lr_tag = next(tag for tag in scalars if tag.startswith("lr-"))
    assert len(scalars[lr_tag]) == 4  # one learning rate per epoch, epoch 3's from the resumed run
    assert tensorboard_hparams(board)[0]["train.max_epochs"] == 4
