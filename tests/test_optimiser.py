"""The optimiser and its schedule as ImageClassifier configures them: one-cycle momentum, SGD, AdamW."""

from __future__ import annotations

import numpy as np
import pytest

from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.fit import fit

pytestmark = pytest.mark.filterwarnings("ignore:.*(LeafSpec|logging interval|srun)")


# ----------------------------------------------------------------------------- optimiser and schedule


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


# ----------------------------------------------------------------------------- the final recipe


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
