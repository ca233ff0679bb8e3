"""Issue 11, "honest numbers": one regression test per point, named after it.

Point 1 (near duplicates) is in test_near_duplicates.py, point 9 (GPU claims in
a SLURM allocation) in test_gpus.py, point 12's rerun half in test_workflow.py
and point 13 (SLURM check) in test_slurm.py.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import digits_at, fit_on

from imgpipe.learn import jobs as experiment
from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.cv import ALWAYS_TRAIN, assign_folds
from imgpipe.learn.fit import fit
from imgpipe.stages.cluster import scores_by_role
from imgpipe.stages.cv import run_cv_fold
from imgpipe.workflow.stage_job import StageJob

pytestmark = pytest.mark.filterwarnings("ignore:.*(LeafSpec|logging interval|srun)")


# ----------------------------------------------------------------------------- 2. CV never peeks


def fold_job(tmp_path, best: dict | None, k: int = 3):
    """A cv_fold job over 120 digits (4 classes, pairs of images in one group) and its folds."""
    images, labels = digits_at(8, 400)
    keep = np.flatnonzero(labels < 4)[:120]
    images, labels = images[keep], labels[keep]
    n = len(labels)
    np.save(tmp_path / "shard.npy", images)
    index = pd.DataFrame(
        {
            "id": range(n),
            "path": [f"/d/{i}.png" for i in range(n)],
            "relpath": [f"{i}.png" for i in range(n)],
            "label": labels.astype(str),
            "source": "train",
            "sha256": "0",
            "group": np.arange(n) // 2,
            "near_group": np.arange(n) // 2,
            "shard": 0,
            "row": range(n),
            "array": str(tmp_path / "shard.npy"),
        }
    )
    index.to_csv(tmp_path / "index.csv", index=False)
    pd.DataFrame({"id": range(n), "role": "train"}).to_csv(tmp_path / "split.csv", index=False)
    np.save(tmp_path / "aug.npy", np.zeros((0, 8, 8, 1), np.uint8))
    pd.DataFrame({"aug_row": [], "source_id": []}).to_csv(tmp_path / "aug.csv", index=False)
    folds = assign_folds(index, k, False, seed=0)
    folds.to_csv(tmp_path / "folds.csv", index=False)
    # The image settings ingest would have made the arrays with (results/ingest/image.json).
    image = {"size": int(images.shape[1]), "mode": "gray", "fit": "pad"}
    (tmp_path / "image.json").write_text(json.dumps(image))
    inputs = {
        "index": str(tmp_path / "index.csv"),
        "split": str(tmp_path / "split.csv"),
        "aug_images": str(tmp_path / "aug.npy"),
        "aug_index": str(tmp_path / "aug.csv"),
        "folds": str(tmp_path / "folds.csv"),
        "image": str(tmp_path / "image.json"),
    }
    if best is not None:
        (tmp_path / "best.yaml").write_text(json.dumps(best))
        inputs["best"] = str(tmp_path / "best.yaml")
    job = StageJob(
        input=inputs,
        output={
            "oof": str(tmp_path / "f0" / "oof.csv"),
            "summary": str(tmp_path / "f0" / "s.json"),
        },
        params={
            "model": {"name": "smallcnn", "channels": [4], "dropout": 0.0},
            "train": {"lr": 0.01, "max_epochs": 6, "min_steps": 0, "batch_size": 16},
            "split": {"val_fraction": 0.2, "seed": 0},
            "fit": "pad",
        },
        wildcards={"fold": "0"},
    )
    return job, index, folds


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


# ----------------------------------------------------------------------------- 4. clusters on test


def test_cluster_scores_are_the_test_roles_images():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    roles = np.where(np.arange(200) % 5 == 0, "test", "train")
    # Training images perfectly grouped by class (the model learned them), test images not.
    clusters = np.where(roles == "train", labels, rng.integers(0, 4, 200))
    X = rng.normal(size=(200, 3))
    scores = scores_by_role(labels, clusters, X, roles, inertia=1.0)
    assert scores["scored_on"] == "test"
    assert scores["by_role"]["train"]["hungarian_accuracy"] == 1.0
    assert scores["hungarian_accuracy"] == scores["by_role"]["test"]["hungarian_accuracy"] < 0.6
    assert scores["n_samples"] == 40


# ----------------------------------------------------------------------------- 5. resume keys


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


# ----------------------------------------------------------------------------- 6. single node


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


# ----------------------------------------------------------------------------- 7. optimiser


def configured_optimiser(tiny_model, train_cfg, epochs=4, steps_per_epoch=5):
    module = ImageClassifier(tiny_model, train_cfg, 2, 1, 8, [0.5], [0.25])

    class FakeTrainer:
        max_epochs = epochs
        estimated_stepping_batches = epochs * steps_per_epoch

    module._trainer = FakeTrainer()
    return module.configure_optimizers()


def test_onecycle_cycles_around_the_configured_momentum(tiny_model, tiny_train):
    for momentum in (0.9, 0.6):
        cfg = {**tiny_train, "schedule": "onecycle", "optimizer": "sgd", "momentum": momentum}
        setup = configured_optimiser(tiny_model, cfg)
        optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
        seen = []
        for _ in range(20):
            seen.append(optimizer.param_groups[0]["momentum"])
            optimizer.step()
            scheduler.step()
        assert max(seen) == pytest.approx(momentum)  # not torch's default 0.95
        assert min(seen) == pytest.approx(momentum * 0.85 / 0.95, rel=1e-3)


def test_sgd_with_momentum_zero_trains(tiny_model, tiny_train, digits16, tmp_path):
    images, labels = digits16
    cfg = {**tiny_train, "optimizer": "sgd", "momentum": 0.0, "max_epochs": 1}
    summary = fit(
        images, labels, np.arange(300), np.arange(300, 400), None, None, tiny_model, cfg, tmp_path
    )
    assert summary["epochs"] == 1


def test_adamw_momentum_is_beta1(tiny_model, tiny_train):
    cfg = {**tiny_train, "schedule": "none", "optimizer": "adamw", "momentum": 0.7}
    optimizer = configured_optimiser(tiny_model, cfg)
    assert optimizer.param_groups[0]["betas"] == (0.7, 0.999)


# ----------------------------------------------------------------------------- 8. DDP metrics


class PerfectClassifier(ImageClassifier):
    """Logits that are right by construction (the label is the image's brightness)."""

    def forward(self, x):
        label = (x.mean(dim=(1, 2, 3)) > 0).long()
        return self.model(x) * 0 + torch.nn.functional.one_hot(label, 2).float() * 10


def test_exact_val_metrics_under_ddp_with_uneven_shards(
    tmp_path, tiny_model, tiny_train, monkeypatch
):
    from imgpipe.learn import fit as training

    images = np.zeros((15, 8, 8, 1), np.uint8)
    labels = np.array([0, 1] * 7 + [1])
    images[labels == 1] = 255
    monkeypatch.setattr(training, "ImageClassifier", PerfectClassifier)
    cfg = {**tiny_train, "max_epochs": 1, "batch_size": 4, "threads": 2}
    # Five validation images on two processes: 3 and 2, all classified right.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = fit_on(
            (images, labels), np.arange(10), np.arange(10, 15), tiny_model, cfg, tmp_path, devices=2
        )
    assert summary["world_size"] == 2
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["val_acc"].tolist() == [1.0]
    assert summary["best_score"] == 1.0


def test_exact_val_metrics_under_ddp_with_wrong_predictions_on_uneven_shards(
    tmp_path, tiny_model, tiny_train, monkeypatch
):
    from imgpipe.learn import fit as training

    images = np.zeros((15, 8, 8, 1), np.uint8)
    labels = np.array([0, 1] * 5 + [0, 0, 0, 0, 1])
    images[labels == 1] = 255
    # Validation ids 10..14 are predicted 1, 0, 1, 0, 1 (brightness) and labelled 0, 0, 0, 0, 1.
    images[[10, 12]] = 255
    monkeypatch.setattr(training, "ImageClassifier", PerfectClassifier)
    cfg = {**tiny_train, "max_epochs": 1, "batch_size": 4, "threads": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_on(
            (images, labels), np.arange(10), np.arange(10, 15), tiny_model, cfg, tmp_path, devices=2
        )
    # Rank 0 holds ids 10, 12, 14 (1 of 3 right), rank 1 ids 11, 13 (2 of 2 right): 3 of 5
    # overall, where a mean of the ranks' (or of the batches') accuracies gives 2/3.
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["val_acc"].tolist() == [pytest.approx(0.6, abs=1e-7)]
    # Cross entropy with logits 10 / 0: ~0 when right, ~10 when wrong: 2 x 10 / 5 images.
    assert history["val_loss"].iloc[0] == pytest.approx(4.0, abs=1e-3)


# ----------------------------------------------------------------------------- 10. channels_last


def telling_weights(model):
    """Conv weights whose layout shows: more than one input channel and a kernel above 1x1.

    (A weight with one input channel, like the first conv of a grey model, is
    contiguous in both layouts at once.)
    """
    weights = [
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[2:] != (1, 1)
    ]
    assert weights, "no conv weight tells the layouts apart"
    return weights


def channels_last(weight):
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_channels_last_is_set_before_ddp_wraps_the_model(
    tmp_path, tiny_model, tiny_train, digits16, monkeypatch, capfd
):
    from pytorch_lightning.strategies import DDPStrategy

    from imgpipe.learn import fit as training

    class ChannelsLast(ImageClassifier):
        """Asks for channels_last on the CPU (as on a GPU) and checks the weights' layout."""

        def setup(self, stage):
            self.channels_last = True
            super().setup(stage)

        def on_train_start(self):
            wrapped = self.trainer.strategy.model
            assert type(wrapped).__name__ == "DistributedDataParallel"
            assert all(map(channels_last, telling_weights(self.model)))

    wrap = DDPStrategy._setup_model

    def wrap_checked(strategy, model):
        # The layout DDP sees when it wraps the model is the one its gradient buckets take.
        assert all(map(channels_last, telling_weights(model))), (
            "DDP wrapped weights that are not channels_last yet"
        )
        return wrap(strategy, model)

    images, labels = digits16
    monkeypatch.setattr(training, "ImageClassifier", ChannelsLast)
    # Patched in the parent, inherited by the forked ranks.
    monkeypatch.setattr(DDPStrategy, "_setup_model", wrap_checked)
    cfg = {**tiny_train, "max_epochs": 1, "threads": 2}
    fit_on(
        (images, labels), np.arange(200), np.arange(200, 260), tiny_model, cfg, tmp_path, devices=2
    )
    # Converted after wrapping, DDP's gradient buckets no longer match the weights' strides.
    assert "Grad strides do not match bucket view strides" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- 11. final recipe


def test_final_model_runs_the_winning_trials_schedule(tiny_model, tiny_train):
    # Issue 20: the final model runs the trial's whole schedule, annealed to its end
    # (no stop at the trial's best epoch, at a still-high learning rate).
    final = {**tiny_train, "schedule": "onecycle", "max_epochs": 8}
    setup = configured_optimiser(tiny_model, final, epochs=8, steps_per_epoch=5)
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert scheduler.total_steps == 8 * 5
    for _ in range(8 * 5 - 1):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 0.01 * final["lr"]


def test_ddp_keeps_the_global_batch_and_the_steps_per_epoch(
    digits16, tmp_path, tiny_model, tiny_train
):
    images, labels = digits16
    cfg = {**tiny_train, "max_epochs": 1, "batch_size": 32, "threads": 2}
    one = fit_on((images, labels), np.arange(320), [], tiny_model, cfg, tmp_path / "one")
    two = fit(
        images, labels, np.arange(320), [], None, None, tiny_model, cfg, tmp_path / "two", devices=2
    )
    # batch_size is the global batch: 2 x 16 per step, the same 10 steps as one process.
    assert one["samples_per_rank"] == [320]
    assert two["samples_per_rank"] == [160, 160]
    steps = [pd.read_csv(tmp_path / run / "history.csv")["step"].iloc[-1] for run in ("one", "two")]
    assert steps[0] == steps[1] == 9  # the step count at the epoch's end, from 0
