"""Sweep trial tables: grid expansion, seeded random sampling, best-trial choice."""

import math

import pandas as pd
import pytest
from snakemake.utils import Paramspace

from imgpipe.sweep import (
    apply_overrides,
    best_config,
    collect_trials,
    column_names,
    grid_trials,
    overrides,
    random_trials,
    trial_table,
)


def test_grid_is_the_cartesian_product_with_readable_columns():
    table = grid_trials({"train.lr": [0.1, 0.01], "model.dropout": [0.0, 0.2, 0.4]})
    assert list(table.columns) == ["lr", "dropout"]
    assert len(table) == 6
    assert set(map(tuple, table.to_numpy())) == {
        (lr, d) for lr in (0.1, 0.01) for d in (0.0, 0.2, 0.4)
    }


def test_colliding_short_names_keep_their_section():
    assert column_names(["train.dropout", "model.dropout"]) == {
        "train.dropout": "train_dropout",
        "model.dropout": "model_dropout",
    }


def test_random_trials_are_seeded_and_prefix_stable():
    ranges = {
        "train.lr": [1e-4, 1e-1],
        "train.batch_size": [16, 128],
        "model.name": ["a", "b", "c"],
    }
    four = random_trials(ranges, 4, seed=3)
    again = random_trials(ranges, 4, seed=3)
    pd.testing.assert_frame_equal(four, again)
    six = random_trials(ranges, 6, seed=3)
    pd.testing.assert_frame_equal(six.head(4), four)
    assert random_trials(ranges, 4, seed=4)["lr"].tolist() != four["lr"].tolist()
    assert all(1e-4 <= v <= 1e-1 for v in six["lr"])
    assert all(isinstance(v, int) and 16 <= v <= 128 for v in six["batch_size"])
    assert set(six["name"]) <= {"a", "b", "c"}


def test_learning_rate_is_log_uniform():
    table = random_trials({"train.lr": [1e-5, 1e-1]}, 400, seed=0)
    logs = table["lr"].map(math.log10)
    # log-uniform over 4 decades: about a quarter of the samples per decade
    below_1e3 = (logs < -3).mean()
    assert 0.35 < below_1e3 < 0.65


def test_paramspace_round_trip_gives_the_overrides():
    sweep = {"method": "grid", "grid": {"train.lr": [0.003, 0.01], "model.name": ["smallcnn"]}}
    space = Paramspace(trial_table(sweep), filename_params="*", single_wildcard="trial")
    patterns = list(space.instance_patterns)
    assert patterns[0] == "lr~0.003_name~smallcnn"
    instance = space.instance({"trial": patterns[1]})
    assert overrides(instance, sweep) == {"train.lr": 0.01, "model.name": "smallcnn"}


def test_apply_overrides_copies_and_refuses_other_sections():
    sections = {"train": {"lr": 1.0}, "model": {"dropout": 0.1}}
    merged = apply_overrides(sections, {"train.lr": 0.5})
    assert merged["train"]["lr"] == 0.5 and sections["train"]["lr"] == 1.0
    with pytest.raises(KeyError):
        apply_overrides(sections, {"clean.blur": 1})


def test_best_trial_and_epochs():
    summaries = [
        {
            "trial": "a",
            "overrides": {"train.lr": 0.1},
            "best_score": 0.9,
            "best_epoch": 3,
            "epochs": 6,
            "seconds": 1.0,
        },
        {
            "trial": "b",
            "overrides": {"train.lr": 0.01},
            "best_score": 0.95,
            "best_epoch": 7,
            "epochs": 10,
            "seconds": 1.0,
        },
    ]
    trials = collect_trials(summaries, "val_acc")
    assert trials["trial"].tolist() == ["b", "a"]
    best = best_config(trials, "val_acc")
    assert best["overrides"] == {"train.lr": 0.01}
    assert best["epochs"] == 8
    loss = collect_trials([{**s, "best_score": 1 - s["best_score"]} for s in summaries], "val_loss")
    assert best_config(loss, "val_loss")["trial"] == "b"
