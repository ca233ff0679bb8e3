"""Weights files into a model: a state dict (possibly nested in a checkpoint), its keys matched,
the first convolution adapted to the input channels; every mismatch named in one error."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from imgpipe.core.errors import DataError
from imgpipe.learn.models import Classifier, adapt_first_conv, first_conv
from imgpipe.learn.pretrained import current_keys, is_named, local_file

# Where a checkpoint file may nest its state dict, and prefixes wrappers add to its keys
# (DataParallel / DDP, torch.compile, Lightning modules, imgpipe's Classifier).
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")
KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.")
# Keys listed at most in an error message.
SHOWN_KEYS = 10


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a state dict, possibly nested in a checkpoint dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(
            f"model.weights: {path} not found (weights are read locally, never downloaded)"
        )
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DataError(f"model.weights: cannot read {path}: {type(err).__name__}: {err}") from err
    while isinstance(state, Mapping) and not all(torch.is_tensor(v) for v in state.values()):
        nested = next(
            (state[k] for k in STATE_DICT_KEYS if isinstance(state.get(k), Mapping)), None
        )
        if nested is None:
            break
        state = nested
    if not isinstance(state, Mapping) or not state:
        raise DataError(f"model.weights: {path} holds no state dict (a mapping of tensors)")
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if len(tensors) != len(state):
        odd = sorted(str(k) for k, v in state.items() if not torch.is_tensor(v))
        raise DataError(f"model.weights: {path}: entries that are not tensors: {odd[:SHOWN_KEYS]}")
    return tensors


def _strip_prefixes(key: str, targets: Mapping[str, Any]) -> str:
    while key not in targets:
        prefix = next((p for p in KEY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            break
        key = key[len(prefix) :]
    return key


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes if p)


def _listing(what: str, keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
    return f"{len(keys)} {what}{'' if len(keys) == 1 else 's'} ({shown})"


def load_weights(model: Classifier, path: str | os.PathLike, name: str) -> None:
    """Load a weights file into the model's backbone; the head stays new (this dataset's classes).

    The file is a state dict, or a checkpoint dict holding one under
    ``state_dict`` / ``model`` / ``model_state_dict`` / ``module``. Key prefixes
    ``module.``, ``_orig_mod.``, ``model.``, ``backbone.`` are stripped where a key
    does not fit as is; the original classifier's keys (``model.head_keys``, an
    imgpipe Classifier's ``head.*``) are dropped. The first convolution is
    adapted to the model's input channels and (small-input stem) kernel size.
    Any other missing or unexpected key or shape mismatch raises a DataError
    that names the file and the keys. A name (``imagenet``, ``timm/<arch>.<tag>``)
    is read from the library's cache (:mod:`imgpipe.learn.pretrained`), never downloaded;
    torchvision's old DenseNet keys (``norm.1``) are renamed as torchvision does.
    """
    if is_named(path):
        path = local_file(name, str(path))
    path = os.fspath(path)
    state = current_keys(read_state_dict(path))
    backbone = model.backbone
    targets = {k: v for k, v in backbone.state_dict().items() if not _under(k, model.head_keys)}
    conv = first_conv(backbone)
    conv_key = f"{conv[0]}.weight" if conv else None
    imgpipe_file = any(".backbone." in f".{k}" for k in state)
    mapped: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for raw, value in state.items():
        key = _strip_prefixes(raw, targets)
        if key not in targets:
            own_head = imgpipe_file and (key.startswith("head.") or key in ("mean", "std"))
            if not (_under(key, model.head_keys) or own_head):
                unexpected.append(raw)
            continue
        want = targets[key].shape
        if key == conv_key and value.shape != want and value.ndim == 4:
            square = value.shape[2] == value.shape[3] and want[2] == want[3]
            if square and value.shape[0] == want[0] and value.shape[2] >= want[2]:
                value = adapt_first_conv(value.float(), want[1], want[2]).to(value.dtype)
        if value.shape != want:
            mismatched.append(f"{raw}: file {tuple(value.shape)}, model {tuple(want)}")
            continue
        mapped[key] = value
    # Old checkpoints lack batch norm's num_batches_tracked: the model keeps its own.
    missing = [k for k in targets if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing or unexpected or mismatched:
        problems = [
            _listing(what, keys)
            for what, keys in (
                ("missing key", missing),
                ("unexpected key", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        dropped = ", ".join(model.head_keys) or "none"
        raise DataError(
            f"model.weights: {path} does not fit model {name}: {'; '.join(problems)} "
            f"(keys compared after stripping the prefixes {', '.join(KEY_PREFIXES)}; "
            f"the original classifier's keys are dropped: {dropped})"
        )
    backbone.load_state_dict(mapped, strict=False)
