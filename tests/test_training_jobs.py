"""Training jobs (sweep trials, CV folds, the final model): what each trains on, its resume key, its
process layout and its schedule. A fold never sees its held-out images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers.fold_jobs import fold_job

from imgpipe.learn import jobs as experiment
from imgpipe.learn.cv import ALWAYS_TRAIN, assign_folds
from imgpipe.stages.cv import run_cv_fold
from imgpipe.workflow.stage_job import StageJob

pytestmark = pytest.mark.filterwarnings("ignore:.*(LeafSpec|logging interval|srun)")


# ----------------------------------------------------------------------------- a fold never peeks


@pytest.mark.parametrize("with_sweep", [True, False])
def test_cv_fold_never_looks_at_its_held_out_images(tmp_path, monkeypatch, with_sweep):
    best = (
        {"trial": "lr~0.01", "overrides": {"train.lr": 0.01}, "epochs": 3} if with_sweep else None
    )
    job, index, folds = fold_job(tmp_path, best)
    seen = {}

    def fake_training(data, train_ids, val_ids, run, job):
        seen.update(train=train_ids, val=val_ids, cfg=run.train)
        raise RuntimeError("stop after planning")

    monkeypatch.setattr(experiment, "run_training", fake_training)
    with pytest.raises(RuntimeError, match="stop after planning"):
        run_cv_fold(job)
    held_out = folds.loc[folds["fold"] == 0, "id"].to_numpy()
    # Neither trained nor validated on (validation picks the epoch and the checkpoint).
    assert not np.isin(held_out, seen["train"]).any()
    assert not np.isin(held_out, seen["val"]).any()
    # The final model's recipe: the whole schedule (no stop at a trial's best
    # epoch), sized on the training pool like every other job.
    assert seen["cfg"]["max_epochs"] == 6 and "schedule_epochs" not in seen["cfg"]
    assert seen["cfg"]["schedule_images"] == 120 and seen["cfg"]["batch_size"] == 16
    if with_sweep:
        assert len(seen["val"]) == 0
    else:
        # An inner split of the fold's own training part, groups kept whole.
        assert 0.1 < len(seen["val"]) / (len(seen["val"]) + len(seen["train"])) < 0.35
        groups = index.set_index("id")["group"]
        assert not set(groups[seen["val"]]) & set(groups[seen["train"]])


def test_single_group_class_stays_in_training_of_every_fold():
    pool = pd.DataFrame(
        {
            "id": range(40),
            "label": ["a"] * 18 + ["b"] * 18 + ["c"] * 4,
            "group": list(range(36)) + [99] * 4,  # class c: one group of four near copies
        }
    )
    folds = assign_folds(pool, 3, False, seed=0)
    c_folds = folds.loc[pool["label"] == "c", "fold"]
    assert (c_folds == ALWAYS_TRAIN).all()  # never held out: no out-of-fold "suspects"
    assert set(folds.loc[pool["label"] != "c", "fold"]) == {0, 1, 2}


# ----------------------------------------------------------------------------- resume keys


def test_resume_key_includes_the_code_fingerprint(tmp_path):
    data = tmp_path / "index.csv"
    data.write_text("id\n0\n")
    job = StageJob(input={"index": str(data)}, code="aaaa")
    edited = StageJob(input={"index": str(data)}, code="bbbb")
    sections = ({"lr": 0.1},)
    assert experiment.resume_key("final", job, *sections) == experiment.resume_key(
        "final", job, *sections
    )
    assert experiment.resume_key("final", job, *sections) != experiment.resume_key(
        "final", edited, *sections
    )


# ----------------------------------------------------------------------------- one process for trials and folds


def test_trials_and_folds_train_in_one_process_whatever_the_layout():
    # The rule params of a trial / fold hold no layout keys; the config asks for 2 x 4 GPUs.
    job = StageJob(
        params={"model": {"name": "smallcnn"}, "train": {"lr": 0.01}},
        threads=3,
        config={"train": {"num_nodes": 2, "gpus_per_node": 4, "cpu_devices": 2, "num_workers": 2}},
    )
    _, train_cfg = experiment.job_sections(job)
    assert train_cfg["num_nodes"] == 1 and train_cfg["gpus_per_node"] == 1
    assert train_cfg["cpu_devices"] == 1 and train_cfg["threads"] == 3
    assert train_cfg["num_workers"] == 2  # loader workers change no result
