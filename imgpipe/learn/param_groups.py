"""What trains at which learning rate: backbone and head parameters, freezing, optimizer groups."""

from __future__ import annotations

from typing import Any

from torch import nn

from imgpipe.core.errors import DataError
from imgpipe.learn.models import Classifier


def head_parameters(model: Classifier) -> list[nn.Parameter]:
    """The head's parameters (trained even with a frozen backbone)."""
    return list(model.head.parameters())


def backbone_parameters(model: Classifier) -> list[nn.Parameter]:
    """Every parameter of the model that is not the head's."""
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def set_backbone_trainable(
    model: Classifier, trainable: bool, *, keep_requires_grad: bool = False
) -> None:
    """Freeze or unfreeze the backbone: no gradient, norm layers in eval mode (statistics kept).

    Frozen, the backbone's features are detached before the head and its norm
    layers stay in eval mode, so no parameter gets a gradient and no running
    statistic moves: with an optimiser that skips parameters without a gradient
    (AdamW, SGD) every backbone tensor stays bit-identical. ``requires_grad`` is
    switched too, unless ``keep_requires_grad``: under DDP, parameters that do not
    require a gradient when the model is wrapped are never synchronised, so a
    backbone unfrozen later must keep ``requires_grad`` (and DDP needs
    ``find_unused_parameters=True`` while it is frozen). A loss term on the
    parameters themselves (an L1 penalty) must then skip the frozen backbone.
    """
    model.backbone_frozen = not trainable
    if not keep_requires_grad or trainable:
        for param in backbone_parameters(model):
            param.requires_grad_(trainable)
    model.train(model.training)


def optimizer_groups(
    model: Classifier, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """Parameter groups: backbone at ``lr * backbone_lr_mult``, head at ``lr``; decay on weights only.

    Frozen parameters are included (the optimiser skips them while they have no
    gradient), so unfreezing needs no new group. Each group carries its ``name``.
    """
    groups = []
    for part, params, part_lr in (
        ("backbone", backbone_parameters(model), lr * backbone_lr_mult),
        ("head", head_parameters(model), lr),
    ):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for suffix, group, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
            if group:
                groups.append(
                    {"name": part + suffix, "params": group, "lr": part_lr, "weight_decay": wd}
                )
    return groups


def parse_freeze(value: str | int | None) -> int | None:
    """``train.freeze`` as the epoch the backbone unfreezes at: 0 none, None never (``backbone``)."""
    if value in (None, "none", 0):
        return 0
    if value == "backbone":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise DataError(f"train.freeze: {value!r} is not none, backbone or a number of epochs >= 1")
