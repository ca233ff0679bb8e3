"""Issue 20: a schedule sized in optimizer steps, and one end-of-schedule rule for trials, folds and the final model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import digits_at, fit_on
from helpers.fold_jobs import fold_job

from imgpipe.learn import jobs as experiment
from imgpipe.learn.schedule import auto_batch_size, epochs_for, sized_schedule, steps_per_epoch
from imgpipe.learn.sweep import best_config, collect_trials
from imgpipe.stages.cv import run_cv_fold
from imgpipe.stages.sweep import run_sweep_trial
from imgpipe.stages.train import run_train_final
from imgpipe.workflow.settings import filled
from imgpipe.workflow.stage_job import StageJob

pytestmark = pytest.mark.filterwarnings("ignore:.*(LeafSpec|logging interval|srun)")


# ----------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize(
    ("images", "batch"),
    [(10, 16), (80, 16), (150, 16), (255, 16), (256, 32), (600, 64), (1023, 64), (1437, 128)]
    + [(1024, 128), (10**6, 128)],
)
def test_auto_batch_is_an_eighth_rounded_down_to_a_power_of_two_within_16_and_128(images, batch):
    assert auto_batch_size(images) == batch


def test_min_steps_stretches_the_epochs_of_small_data_only():
    cfg = {"max_epochs": 10, "min_steps": 150, "batch_size": "auto"}
    # 120 pool images (150 with the default 20% test share): batch 16, 7 steps per epoch.
    assert steps_per_epoch(120, 16) == 7
    assert epochs_for(cfg, 120, 16) == 22  # ceil(150 / 7)
    # The demo's 1,437 images: batch 128, 11 steps per epoch -> 14 epochs.
    assert sized_schedule(cfg, 1437)["max_epochs"] == 14
    # Enough data: max_epochs rules (20,000 images: 156 steps per epoch).
    assert sized_schedule(cfg, 20_000)["max_epochs"] == 10
    # min_steps 0: epochs only, as before.
    assert epochs_for({**cfg, "min_steps": 0}, 120, 16) == 10
    # Absent: the schema's default (150), filled in by sized_schedule, never a second default.
    with pytest.raises(KeyError, match="min_steps"):
        epochs_for({"max_epochs": 3}, 120, 16)
    assert sized_schedule({"max_epochs": 3}, 120)["max_epochs"] == 22
    # Fewer images than one batch: one (ragged) step per epoch.
    assert steps_per_epoch(10, 16) == 1


def test_sized_schedule_uses_the_pool_and_sizes_once():
    cfg = {"max_epochs": 10, "min_steps": 150, "batch_size": "auto", "lr": 0.01}
    pooled = sized_schedule({**cfg, "schedule_images": 120}, n_images=90)
    # Sized on the pool (120), not on the run's own 90 images.
    assert pooled["batch_size"] == 16 and pooled["max_epochs"] == 22
    assert pooled["schedule_images"] == 120 and pooled["lr"] == 0.01
    assert sized_schedule(pooled, n_images=50) == pooled  # idempotent
    fixed = sized_schedule({**cfg, "batch_size": 32}, n_images=120)
    assert fixed["batch_size"] == 32 and fixed["max_epochs"] == 50  # ceil(150 / 3)
    with pytest.raises(ValueError, match="number of images"):
        sized_schedule(cfg, n_images=0)


def test_fit_runs_the_stretched_schedule_and_logs_its_steps(tmp_path, tiny_model, tiny_train):
    images, labels = digits_at(8, 120)
    cfg = {**tiny_train, "max_epochs": 1, "min_steps": 12, "batch_size": "auto"}
    summary = fit_on((images, labels), np.arange(64), np.arange(64, 96), tiny_model, cfg, tmp_path)
    # 64 images: batch auto 16, 4 steps per epoch; 12 steps need 3 epochs, not 1.
    assert summary["batch_size"] == 16 and summary["steps_per_epoch"] == 4
    assert summary["epochs"] == summary["scheduled_epochs"] == 3
    assert summary["steps"] == 12
    # The trial score is the last epoch's validation accuracy, and the model the last epoch's.
    history = pd.read_csv(tmp_path / "history.csv")
    assert summary["score"] == pytest.approx(history["val_acc"].iloc[-1])
    assert summary["last_val_loss"] == pytest.approx(history["val_loss"].iloc[-1])
    assert summary["model_epoch"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 12


# ----------------------------------------------------------------------------- one rule, every job


def recipe_jobs(tmp_path) -> tuple[StageJob, StageJob, StageJob]:
    """A sweep trial, a CV fold and a final-model job on 120 digits (84 train, 16 val, 20 test)."""
    fold, _, _ = fold_job(tmp_path, {"trial": "lr~0.01", "overrides": {"train.lr": 0.01}})
    roles = ["train"] * 84 + ["val"] * 16 + ["test"] * 20
    pd.DataFrame({"id": range(120), "role": roles}).to_csv(tmp_path / "split.csv", index=False)
    train = {"lr": 0.01, "max_epochs": 4, "min_steps": 40, "batch_size": "auto", "seed": 0}
    params = {**fold.params, "train": train}
    common = {"params": params, "code": "c", "config": {}}
    trial = StageJob(
        input=fold.input,
        output={"summary": str(tmp_path / "trial" / "summary.json")},
        wildcards={"trial": "lr~0.01"},
        **{**common, "params": {**params, "overrides": {"train.lr": 0.01}}},
    )
    # train_final's params also carry what its model file records for prediction.
    recorded = {
        "clean": filled("clean"),
        "max_pixels": filled("ingest")["max_pixels"],
        "extensions": filled("data", {"root": "data"})["extensions"],
    }
    final = StageJob(
        input=fold.input,
        output={"model": str(tmp_path / "final" / "model.ckpt")},
        **{**common, "params": {**params, **recorded}},
    )
    cv = StageJob(input=fold.input, output=fold.output, wildcards=fold.wildcards, **common)
    return trial, cv, final


def test_trials_folds_and_final_model_share_one_whole_schedule(tmp_path, monkeypatch):
    trial_job, fold_job_, final_job = recipe_jobs(tmp_path)
    seen = {}

    def fake_training(data, train_ids, val_ids, run, job):
        kind = Path(run.tensorboard_dir).parent.name  # results/tensorboard/<kind>/<run>
        seen[job.rule or kind] = {"cfg": run.train, "val": len(val_ids)}
        raise RuntimeError("planned")

    monkeypatch.setattr(experiment, "run_training", fake_training)
    for run in (run_sweep_trial, run_cv_fold, run_train_final):
        job = {"run_sweep_trial": trial_job, "run_cv_fold": fold_job_}.get(run.__name__, final_job)
        with pytest.raises(RuntimeError, match="planned"):
            run(job)
    # Sized on the 100 pool images: batch 16 (auto), 6 steps per epoch, 40 steps -> 7 epochs.
    for kind in ("sweep", "cv", "final"):
        cfg = seen[kind]["cfg"]
        assert (cfg["batch_size"], cfg["max_epochs"], cfg["schedule_images"]) == (16, 7, 100), kind
        assert "schedule_epochs" not in cfg  # no stop at a trial's best epoch
    assert seen["sweep"]["val"] == 16
    assert seen["final"]["val"] == 0 and seen["cv"]["val"] == 0  # the winner's recipe: no picking


def test_final_models_epochs_equal_the_schedules(tmp_path, monkeypatch, tiny_model):
    trial_job, _, final_job = recipe_jobs(tmp_path)
    monkeypatch.chdir(tmp_path)  # resume state and TensorBoard runs go under the cwd
    model = {**tiny_model, "name": "smallcnn"}
    trial_job.params["model"] = final_job.params["model"] = model
    monkeypatch.setattr(experiment, "record_test_metrics", lambda job, path, *factory: {})
    trial = run_sweep_trial(trial_job)
    best = best_config(collect_trials([trial], "val_acc"), "val_acc")
    (tmp_path / "best.yaml").write_text(json.dumps(best))
    final_job.input["best"] = str(tmp_path / "best.yaml")
    final = run_train_final(final_job)
    # The trial ran its whole schedule and was scored at its end; the final model runs it all.
    assert trial["epochs"] == trial["scheduled_epochs"] == best["epochs"] == 7
    assert best["score"] == trial["score"] == trial["last_val_acc"]
    assert final["epochs"] == final["scheduled_epochs"] == best["epochs"]
    assert final["model_epoch"] == best["epochs"] - 1
    assert final["batch_size"] == trial["batch_size"] == 16
    # Same epochs over more images (100 vs 84): more steps per epoch, same batch.
    assert (trial["steps_per_epoch"], final["steps_per_epoch"]) == (5, 6)
    # Calibration: the final model (no validation images) takes the winner's temperature.
    assert final["temperature"] == best["temperature"] == trial["temperature"]
    assert "validation images" in trial["temperature_fitted_on"]
    assert "sweep winner" in final["temperature_fitted_on"]


def test_the_model_files_test_metrics_are_those_of_evaluates_metrics_json(tmp_path, monkeypatch):
    """One computation of the test set's scores: the final model's stamp is metrics.json's, key for key."""
    import torch

    from imgpipe.data.dataset import class_names, load_index
    from imgpipe.data.split import load_split, rows_of_test_set
    from imgpipe.infer.modelfile import METADATA_KEY
    from imgpipe.stages.evaluate import evaluate_predictions

    _, _, final_job = recipe_jobs(tmp_path)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=20)  # some right, some wrong: the scores differ from 1
    monkeypatch.setattr("imgpipe.infer.inference.predict_proba", lambda *args, **kw: probs)
    model_path = tmp_path / "model.ckpt"
    torch.save({METADATA_KEY: {}}, model_path)
    stamp = experiment.record_test_metrics(final_job, model_path)["test_metrics"]
    index = load_index(final_job.input["index"])
    rows = rows_of_test_set(index, load_split(final_job.input["split"]))
    outputs = {
        name: str(tmp_path / "evaluate" / name)
        for name in ("metrics", "confusion", "confusion_png", "per_class", "predictions")
    }
    metrics = evaluate_predictions(rows, probs, class_names(index), outputs)
    assert stamp == {key: metrics[key] for key in stamp}
    assert list(stamp) == ["n_test", "accuracy", "balanced_accuracy", "f1_macro"]
    assert 0 < stamp["accuracy"] < 1
