"""train.class_weights: balanced weighs each class's loss by n / (classes x its count), as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss
from sklearn.utils.class_weight import compute_class_weight

from imgpipe.learn.classifier_module import ImageClassifier
from imgpipe.learn.fit import class_weights

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log")


def classifier(weights):
    torch.manual_seed(0)
    return ImageClassifier(
        {"name": "smallcnn", "channels": [4], "dropout": 0.0},
        {"lr": 0.01, "label_smoothing": 0.0},
        num_classes=3,
        in_channels=1,
        image_size=8,
        mean=[0.5],
        std=[0.25],
        class_weights=weights,
    ).eval()


def test_balanced_weights_are_scikit_learns_and_the_loss_is_their_weighted_cross_entropy():
    train_labels = np.array([0] * 12 + [1] * 3 + [2] * 1)  # imbalanced training set
    weights = class_weights(train_labels, 3, {"class_weights": "balanced"})
    expected = compute_class_weight("balanced", classes=np.arange(3), y=train_labels)
    np.testing.assert_allclose(weights, expected)  # 16 / (3 x count)
    assert class_weights(train_labels, 3, {"class_weights": "none"}) is None

    rng = np.random.default_rng(0)
    x8 = torch.from_numpy(rng.integers(0, 256, (10, 1, 8, 8), dtype=np.uint8))
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])  # a fixed batch
    weighted, plain = classifier(weights), classifier(None)
    x = weighted.preprocess(x8)
    with torch.no_grad():
        probs = torch.softmax(weighted(x).double(), dim=1).numpy()
        loss = float(weighted.training_step((x, y), 0))
        unweighted = float(plain.training_step((x, y), 0))
    # Both modules hold the same network (same seed): only the weights differ.
    assert loss == pytest.approx(
        log_loss(y.numpy(), probs, sample_weight=expected[y.numpy()], labels=[0, 1, 2]), rel=1e-5
    )
    assert unweighted == pytest.approx(log_loss(y.numpy(), probs, labels=[0, 1, 2]), rel=1e-5)
    assert abs(loss - unweighted) > 1e-3  # the rare classes' terms count more


def test_a_class_missing_from_training_gets_weight_zero():
    weights = class_weights(np.array([0, 0, 2]), 3, {"class_weights": "balanced"})
    assert weights == pytest.approx([0.75, 0.0, 1.5])
