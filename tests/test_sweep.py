"""Sweep trial tables: grid expansion, seeded random sampling, best-trial choice."""

import math

import pandas as pd
import pytest
from snakemake.utils import Paramspace

from imgpipe.learn.sweep import (
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


def trial_summary(trial: str, lr: float, score: float, val_loss: float, **extra) -> dict:
    """A sweep trial's summary.json as fit writes it (the fields collect_trials reads)."""
    return {
        "trial": trial,
        "overrides": {"train.lr": lr},
        "score": score,
        "last_val_acc": score,
        "last_val_loss": val_loss,
        "best_score": extra.pop("best_score", score),
        "best_epoch": extra.pop("best_epoch", 9),
        "epochs": 10,
        "steps": 110,
        "seconds": 1.0,
        **extra,
    }


def test_best_trial_is_scored_at_its_last_epoch():
    summaries = [
        # a: a lucky best epoch (0.99 at epoch 4), but 0.9 at the end of its schedule.
        trial_summary("a", 0.1, 0.9, 0.3, best_score=0.99, best_epoch=4),
        trial_summary("b", 0.01, 0.95, 0.2),
    ]
    trials = collect_trials(summaries, "val_acc")
    assert trials["trial"].tolist() == ["b", "a"]
    assert trials["val_acc"].tolist() == [0.95, 0.9]
    best = best_config(trials, "val_acc")
    assert best["overrides"] == {"train.lr": 0.01}
    # The final model runs the whole schedule the winner was scored at the end of.
    assert best["epochs"] == 10 and best["rule"] == "last epoch"
    loss = [{**s, "score": s["last_val_loss"]} for s in summaries]
    assert best_config(collect_trials(loss, "val_loss"), "val_loss")["trial"] == "b"


def test_a_tie_goes_to_the_lower_loss_then_to_the_earlier_trial():
    # Accuracy ties (coarse steps on a few hundred images): the lower last-epoch loss wins,
    # even when it is the later trial of the sweep.
    tied = [trial_summary("a", 0.003, 0.98, 0.30), trial_summary("b", 0.01, 0.98, 0.25)]
    assert best_config(collect_trials(tied, "val_acc"), "val_acc")["trial"] == "b"
    # A tie on both: the trial listed first in the sweep, whatever its name.
    same = [trial_summary("z", 0.003, 0.98, 0.25), trial_summary("a", 0.01, 0.98, 0.25)]
    assert best_config(collect_trials(same, "val_acc"), "val_acc")["trial"] == "z"
    # Scored on the loss, a tie goes to the higher last-epoch accuracy.
    by_loss = [
        {**trial_summary("a", 0.003, 0.97, 0.2), "score": 0.2},
        {**trial_summary("b", 0.01, 0.98, 0.2), "score": 0.2},
    ]
    assert best_config(collect_trials(by_loss, "val_loss"), "val_loss")["trial"] == "b"
