"""imgpipe.learn.launch: the srun command, the job file, and two DDP ranks wired by a (fake) SLURM."""

import json
import os
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from imgpipe.core.errors import DataError
from imgpipe.infer.inference import predict_proba
from imgpipe.infer.modelfile import METADATA_KEY
from imgpipe.learn.launch import (
    JOB_FILE,
    LAUNCHED_VAR,
    launch_ranks,
    make_job,
    read_job,
    run_rank,
    should_launch,
    srun_command,
    tasks_per_node,
    write_job,
)
from imgpipe.learn.training_run import TrainingRun
from imgpipe.stages.demo import digits_images

ROOT = Path(__file__).resolve().parents[1]


def a_run(model_cfg, train_cfg, out_dir, resume_dir, image_fit="pad", size=16) -> TrainingRun:
    """A training run as experiment.training_run builds it for the final model (image.json's settings)."""
    return TrainingRun(
        model=model_cfg,
        train=train_cfg,
        augment={},
        image={"size": size, "mode": "gray", "fit": image_fit},
        out_dir=str(out_dir),
        resume_dir=str(resume_dir),
    )


@pytest.fixture
def ddp_train(tiny_train):
    """The tiny train section for one epoch of two ranks."""
    return {**tiny_train, "max_epochs": 1, "num_nodes": 1, "gpus_per_node": 2}


# Stands in for srun inside an allocation: starts --ntasks-per-node copies of the
# command with the variables SLURM gives each task, records its arguments.
FAKE_SRUN = textwrap.dedent(
    """\
    #!{python}
    import os, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_SRUN_ARGS"], "w") as fh:
        fh.write("\\n".join(args))
    if os.environ.get("FAKE_SRUN_FAIL"):
        sys.exit(3)
    opts = {{}}
    while args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        opts[key] = value
    nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
    assert nodes == 1, "the fake runs one node"
    procs = []
    for rank in range(per_node):
        env = dict(os.environ, SLURM_NTASKS=str(per_node), SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_NNODES="1",
                   SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NODELIST="127.0.0.1",
                   SLURM_JOB_NAME="fake")
        procs.append(subprocess.Popen(args, env=env))
    sys.exit(max(p.wait() for p in procs))
    """
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """A fake srun first on PATH, inside a fake SLURM job; returns the file its arguments go to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    args_file = tmp_path / "srun-args.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SRUN_ARGS", str(args_file))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return args_file


@pytest.fixture
def digit_files(tmp_path):
    """index.csv, split.csv and augmented views of 300 digits, as the workflow writes them."""
    images, labels = digits_images()
    n = 300
    images = np.stack([cv2.resize(im, (16, 16)) for im in images[:n]])[:, :, :, None]
    array = tmp_path / "images.npy"
    np.save(array, images)
    index = pd.DataFrame(
        {
            "id": range(n),
            "path": [f"/data/{i}.png" for i in range(n)],
            "relpath": [f"{i}.png" for i in range(n)],
            "label": labels[:n].astype(str),
            "source": "train",
            "sha256": "0",
            "group": range(n),
            "near_group": range(n),
            "shard": 0,
            "row": range(n),
            "array": str(array),
        }
    )
    index.to_csv(tmp_path / "index.csv", index=False)
    roles = np.where(np.arange(n) < 240, "train", "val")
    pd.DataFrame({"id": range(n), "role": roles}).to_csv(tmp_path / "split.csv", index=False)
    np.save(tmp_path / "aug.npy", np.roll(images[:240], 1, axis=2))
    pd.DataFrame({"aug_row": range(240), "source_id": range(240)}).to_csv(
        tmp_path / "aug.csv", index=False
    )
    inputs = {
        "index": tmp_path / "index.csv",
        "split": tmp_path / "split.csv",
        "aug_images": tmp_path / "aug.npy",
        "aug_index": tmp_path / "aug.csv",
    }
    return inputs, images, labels[:n]


def test_srun_command_asks_one_task_per_gpu_on_each_node(tmp_path):
    cmd = srun_command(tmp_path / "job.json", 2, 4, cpus_per_task=8, python="/venv/bin/python")
    assert cmd[0] == "srun"
    assert {"--nodes=2", "--ntasks-per-node=4", "--kill-on-bad-exit=1", "--cpus-per-task=8"} <= set(
        cmd
    )
    assert cmd[-4:] == [
        "/venv/bin/python",
        "-m",
        "imgpipe.learn.launch",
        str(tmp_path / "job.json"),
    ]
    assert not any(a.startswith("--cpus-per-task") for a in srun_command("j", 1, 2))


@pytest.mark.parametrize(
    ("nodes", "gpus", "env", "expected"),
    [
        (2, 4, {"SLURM_JOB_ID": "7"}, True),
        (1, 2, {"SLURM_JOB_ID": "7"}, True),
        (1, 1, {"SLURM_JOB_ID": "7"}, False),  # the single-GPU default runs in the job itself
        (2, 4, {}, False),  # a local run: the single-machine path
        (2, 4, {"SLURM_JOB_ID": "7", LAUNCHED_VAR: "1"}, False),  # a rank never launches again
    ],
)
def test_should_launch_only_in_a_slurm_job_with_several_ranks(nodes, gpus, env, expected):
    assert should_launch(nodes, gpus, env) is expected


def test_tasks_per_node_reads_slurm_forms():
    assert tasks_per_node({"SLURM_NTASKS_PER_NODE": "4"}) == 4
    assert tasks_per_node({"SLURM_NTASKS_PER_NODE": "2(x3)"}) == 2
    with pytest.raises(RuntimeError, match="srun"):
        tasks_per_node({})


def test_job_file_round_trip_with_absolute_paths(
    tmp_path, digit_files, monkeypatch, tiny_model, ddp_train
):
    inputs, _, _ = digit_files
    monkeypatch.chdir(tmp_path)
    relative = {key: os.path.relpath(path, tmp_path) for key, path in inputs.items()}
    job = make_job(relative, ["train"], ["val"], a_run(tiny_model, ddp_train, "out", "state"))
    path = write_job(job, tmp_path / "out" / JOB_FILE)
    assert read_job(path) == job
    assert all(Path(p).is_absolute() and Path(p).exists() for p in job["inputs"].values())
    assert job["run"]["out_dir"] == str(tmp_path / "out")
    assert [p.name for p in path.parent.iterdir()] == [JOB_FILE]  # no temporary file left
    del job["run"]["image"]
    path.write_text(json.dumps(job))
    with pytest.raises(ValueError, match="image"):
        read_job(path)
    del job["train_roles"]
    path.write_text(json.dumps(job))
    with pytest.raises(ValueError, match="train_roles"):
        read_job(path)


def test_failed_srun_raises_and_keeps_the_job_file(
    tmp_path, digit_files, fake_srun, monkeypatch, tiny_model, ddp_train
):
    inputs, _, _ = digit_files
    monkeypatch.setenv("FAKE_SRUN_FAIL", "1")
    job = make_job(inputs, ["train"], ["val"], a_run(tiny_model, ddp_train, tmp_path / "out", "s"))
    with pytest.raises(RuntimeError, match="srun exited with 3"):
        launch_ranks(job)
    assert (tmp_path / "out" / JOB_FILE).is_file()


@pytest.mark.filterwarnings("ignore")
def test_two_srun_ranks_train_one_model(tmp_path, digit_files, fake_srun, tiny_model, ddp_train):
    """launch_ranks -> srun -> 2 x `python -m imgpipe.learn.launch`: Lightning wires the ranks from SLURM_*."""
    inputs, images, labels = digit_files
    out_dir = tmp_path / "out"
    run = a_run(tiny_model, ddp_train, out_dir, tmp_path / "state")
    job = make_job(inputs, ["train"], ["val"], run)
    log_path = tmp_path / "ranks.log"
    with open(log_path, "w") as log:
        summary = launch_ranks(job, cpus_per_task=1, stdout=log)
    ranks_log = log_path.read_text()
    args = fake_srun.read_text().splitlines()
    assert {"--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"} <= set(args)
    assert "rank 0 of 2" in ranks_log and "rank 1 of 2" in ranks_log, ranks_log[-3000:]
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"
    # Both ranks trained, on equal shares: 240 images + 240 views -> 240 per rank -> 7 full
    # batches of 32 (the last partial batch is dropped).
    # batch_size 32 is the global batch: 16 per rank; 480 images (240 + their 240 views) -> 15 steps.
    assert summary["samples_per_rank"] == [15 * 16, 15 * 16]
    assert summary["train_images"] == 240 and summary["val_images"] == 60
    assert not (out_dir / JOB_FILE).exists() and not (tmp_path / "state").exists()
    proba = predict_proba(out_dir / "model.ckpt", images[240:])
    accuracy = (proba.argmax(axis=1) == labels[240:]).mean()
    assert accuracy == pytest.approx(summary["score"], abs=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_an_srun_rank_records_the_class_names_and_image_settings(
    tmp_path, digit_files, tiny_model, tiny_train
):
    """run_rank in this process (one task, no srun): its model file names the classes as the data does."""
    inputs, _, _ = digit_files
    index = pd.read_csv(inputs["index"])
    index["label"] = "digit-" + index["label"].astype(str)
    index.to_csv(inputs["index"], index=False)
    train = {**tiny_train, "max_epochs": 1, "num_nodes": 1, "gpus_per_node": 1}
    run = a_run(tiny_model, train, tmp_path / "out", tmp_path / "state", image_fit="crop")
    job = read_job(write_job(make_job(inputs, ["train"], ["val"], run), tmp_path / JOB_FILE))
    summary = run_rank(job, env={"SLURM_NTASKS_PER_NODE": "1"})
    assert summary["world_size"] == 1
    state = torch.load(tmp_path / "out" / "model.ckpt", weights_only=True)
    meta = state[METADATA_KEY]
    # Without them fit saved classes "0".."9" and `fit: pad`, whatever the data and config said.
    assert meta["class_names"] == [f"digit-{d}" for d in range(10)]
    assert meta["image"] == {"size": 16, "mode": "gray", "fit": "crop"}


def test_a_rank_refuses_arrays_that_image_json_does_not_describe(
    tmp_path, digit_files, tiny_model, tiny_train
):
    """The run's image settings come from image.json; arrays of another size stop with one clear line."""
    inputs, _, _ = digit_files
    train = {**tiny_train, "max_epochs": 1, "num_nodes": 1, "gpus_per_node": 1}
    run = a_run(tiny_model, train, tmp_path / "out", tmp_path / "state", size=32)
    job = read_job(write_job(make_job(inputs, ["train"], ["val"], run), tmp_path / JOB_FILE))
    with pytest.raises(DataError, match=r"shape \(16, 16, 1\).*size 32 and mode gray"):
        run_rank(job, env={"SLURM_NTASKS_PER_NODE": "1"})
    assert not (tmp_path / "out" / "model.ckpt").exists()
