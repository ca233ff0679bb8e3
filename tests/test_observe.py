"""Watching and comparing runs on a real tiny run: progress on the terminal, TensorBoard, runs.csv."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from helpers.workflow_utils import FINISHED_RUN_CONFIG, snakemake, write_config
from test_training import tensorboard_hparams, tensorboard_scalars


def epoch_lines(terminal: str, job: str) -> list[tuple[int, int]]:
    """(epoch, of epochs) of every epoch line a job printed on the terminal."""
    found = re.findall(rf"^\[{re.escape(job)}\] epoch (\d+)/(\d+): ", terminal, re.MULTILINE)
    return [(int(i), int(n)) for i, n in found]


@pytest.mark.slow
def test_a_tiny_run_shows_progress_writes_tensorboard_and_logs_each_run_once(
    finished_run, finished_copy
):
    results = finished_run / "results"
    terminal = (finished_run.parent / "terminal.txt").read_text()

    # Each training job's epoch lines on the terminal: one per epoch it trained, in order.
    trials = sorted(p.name for p in (results / "sweep" / "trials").iterdir())
    assert len(trials) == 2
    jobs = {f"sweep/{t}": results / "sweep" / "trials" / t for t in trials}
    jobs |= {f"cv/fold-{k}": results / "cv" / f"fold-{k}" for k in range(2)}
    jobs["train/final"] = results / "train" / "final"
    for job, folder in jobs.items():
        epochs = len(pd.read_csv(folder / "history.csv"))
        max_epochs = json.loads((folder / "summary.json").read_text()).get("epochs", epochs)
        assert epochs >= 1
        lines = epoch_lines(terminal, job)
        assert [i for i, _ in lines] == list(range(1, epochs + 1)), (job, lines)
        assert {n for _, n in lines} <= {max_epochs, FINISHED_RUN_CONFIG["train"]["max_epochs"]}
    # The data stages' closing progress lines, each with its job.
    for line in (
        r"^\[ingest/shard-0\] shard 0: \d+/\d+ files in ",
        r"^\[augment\] augment: \d+/\d+ images in ",
        r"^\[cluster/pixels\] pixel features: 80/80 images in ",
    ):
        assert re.search(line, terminal, re.MULTILINE), line
    # The log files hold the same lines, and no carriage-return bar.
    assert "epoch 1/" in (finished_run / "logs" / "train" / "final.log").read_text()
    for log in (finished_run / "logs").rglob("*.log"):
        assert "\r" not in log.read_text(errors="replace"), log

    # TensorBoard: one run per training job, the trials' hyper-parameters their overrides.
    board = results / "tensorboard"
    runs = {f"sweep/{t}" for t in trials} | {"cv/fold-0", "cv/fold-1", "final/final"}
    assert {str(p.parent.relative_to(board)) for p in board.rglob("events.out.*")} == runs
    best = pd.read_csv(results / "sweep" / "trials.csv").iloc[0]
    for run in runs:
        assert len(list((board / run).glob("events.out.*"))) == 1, run
        scalars = tensorboard_scalars(board / run)
        assert "train_loss" in scalars, run
        hparams, metrics = tensorboard_hparams(board / run)
        assert "hp/train_loss" in metrics
        if run.startswith("sweep/"):
            overrides = json.loads(
                (results / "sweep" / "trials" / run[6:] / "summary.json").read_text()
            )["overrides"]
            assert overrides and all(
                hparams[key] == pytest.approx(value) for key, value in overrides.items()
            ), (run, overrides, hparams)
            assert "hp/best_val_acc" in metrics
        else:  # the folds and the final model train with the winner's settings
            assert hparams["train.lr"] == pytest.approx(best["train.lr"])

    # runs.csv: one row per run of the DAG (the next runs in a copy of the finished run).
    workdir = finished_copy
    results = workdir / "results"
    log = results / "runs.csv"
    assert len(pd.read_csv(log)) == 1
    rerun = snakemake(workdir)  # nothing to do: no job, no row
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
    assert len(pd.read_csv(log)) == 1
    # A tweak that reruns the clustering and the report, with --quiet: a second row, no progress.
    write_config(workdir, {"cluster": {"n_init": 3}})
    quiet = snakemake(workdir, "--quiet")
    assert "[cluster/pixels]" not in quiet.stdout + quiet.stderr
    runs_log = pd.read_csv(log)
    assert len(runs_log) == 2
    assert runs_log["changes"].iloc[1] == "cluster.n_init 2 → 3"
    assert runs_log["data_fingerprint"].nunique() == 1
    assert "cluster.n_init 2 → 3" in (results / "report" / "index.html").read_text()
