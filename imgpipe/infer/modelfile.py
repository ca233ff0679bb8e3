"""The model file's description of itself: what ``results/train/final/model.ckpt`` says about the model.

Written by training (``model_metadata``) and completed by the final model's job
(test metrics, the quality checks and file types prediction applies); read by
``imgpipe.infer.inference.load_model`` and the exports' sidecars. Plain types only, so
the checkpoint loads with ``torch.load(weights_only=True)``.

Reading one back, nothing in it is ever run: ``read_checkpoint`` turns any file
torch cannot load safely into one line, and ``validate_model_file`` checks every
field before anything is built (the model from a closed set of names, or the
``package.module:factory`` the caller names; sizes, channels and class names
type- and range-checked).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from imgpipe.core.atomic import plain
from imgpipe.core.errors import DataError
from imgpipe.learn.calibration import checked_temperature

METADATA_KEY = "imgpipe"
METADATA_FORMAT = 1


def config_hash(hparams: Mapping[str, Any]) -> str:
    """sha256 of the settings a model was trained with: its model, train, augment and image sections."""
    sections = {
        "model": hparams.get("model_cfg"),
        "train": hparams.get("train_cfg"),
        "augment": hparams.get("augment_cfg"),
        "image": hparams.get("image_cfg"),
    }
    text = json.dumps(plain(sections), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_metadata(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """What a model file says about itself: version, config hash, architecture, classes, input.

    Class names in label order, the image settings (size, mode, fit), the
    normalisation and the architecture with its arguments: enough to use the
    file alone (``imgpipe.infer.inference.load_model``). ``run_train_final`` adds the
    clean settings and the test metrics of the final model.
    """
    import torch

    import imgpipe

    model_cfg = dict(hparams.get("model_cfg") or {})
    num_classes = int(hparams["num_classes"])
    names = hparams.get("class_names")
    channels = int(hparams["in_channels"])
    # A file without image settings (written before it had them): its arrays' size and
    # channels, padded (the only fit there was).
    image_cfg = {
        "size": hparams["image_size"],
        "mode": "rgb" if channels == 3 else "gray",
        "fit": "pad",
        **(hparams.get("image_cfg") or {}),
    }
    return plain(
        {
            "format": METADATA_FORMAT,
            "imgpipe_version": imgpipe.__version__,
            "torch_version": torch.__version__.split("+")[0],
            "config_sha256": config_hash(hparams),
            "architecture": {
                "name": model_cfg.get("name"),
                "num_classes": num_classes,
                "in_channels": channels,
                "image_size": int(hparams["image_size"]),
                "channels": model_cfg.get("channels"),
                # A file written before smallcnn had a stem: the layout without one.
                "stem": model_cfg.get("stem", "none"),
                "dropout": model_cfg.get("dropout"),
                "weights": model_cfg.get("weights"),
            },
            "class_names": list(names) if names else [str(c) for c in range(num_classes)],
            "image": {
                "size": int(image_cfg["size"]),
                "mode": image_cfg["mode"],
                "fit": image_cfg["fit"],
            },
            "normalisation": {
                "scale": 1 / 255,
                "mean": [float(v) for v in hparams["mean"]],
                "std": [float(v) for v in hparams["std"]],
            },
            # Probabilities are softmax(logits / temperature) (imgpipe.learn.calibration).
            "temperature": float(hparams.get("temperature", 1.0)),
        }
    )


# The clean settings prediction applies: the per-image quality checks (duplicates,
# label conflicts and class sizes concern a training set, not new images).
QUALITY_KEYS = ("min_side", "max_aspect", "low_information", "dark", "bright", "blur")


# ----------------------------------------------------------------------------- checking a model file
#
# A model file is data, never code: nothing it names is imported or called. What it
# says about its model is checked here, field by field, before anything is built
# from it (``validate_model_file``); every load path (``imgpipe.infer.inference``, the
# export, the pipeline's own stages) goes through it.

# The hyper-parameters ImageClassifier takes (what ``save_hyperparameters`` wrote).
HPARAM_KEYS = (
    "model_cfg",
    "train_cfg",
    "num_classes",
    "in_channels",
    "image_size",
    "mean",
    "std",
    "augment_cfg",
    "class_names",
    "image_cfg",
    "class_weights",
    "temperature",
)
REQUIRED_HPARAMS = ("model_cfg", "num_classes", "in_channels", "image_size", "mean", "std")
# config/schema.yaml's image.size range; imgpipe's colour modes and their channels.
IMAGE_SIZE_RANGE = (4, 1024)
MODE_CHANNELS = {"gray": 1, "rgb": 3}
FITS = ("pad", "crop")
MAX_CLASSES = 100_000
NORMALIZE_MODES = ("auto", "imagenet", "data")
SMALL_CNN_STEMS = ("auto", "none")  # imgpipe.learn.models.SMALL_CNN_STEMS (no torch import here)
# model_cfg keys a model file written by an older release may lack, and what such a file was
# built with: its smallcnn widths and dropout of the time, normalisation auto, and no stem
# (smallcnn had none before model.stem existed).
OLDER_FILES_MODEL_CFG = {
    "channels": (16, 32, 64),
    "dropout": 0.3,
    "normalize": "auto",
    "stem": "none",
}
TORCHSCRIPT_NOTE = (
    "a TorchScript file is a program (PyTorch's security notes: load only files you trust); "
    "if you trust it, pass --trust-torchscript (trust_torchscript=True); "
    "the exported model.onnx is the safe alternative"
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(value: Any, what: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise DataError(f"{what} is {_shown(value)}, expected an integer in [{low}, {high}]")
    return int(value)


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mapping(value: Any, what: str, optional: bool = False) -> dict[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise DataError(f"{what} is {_shown(value)}, expected a mapping with string keys")
    return dict(value)


def _numbers(value: Any, what: str, length: int, positive: bool = False) -> list[float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != length
        or not all(_is_number(v) and (v > 0 or not positive) for v in value)
    ):
        kind = "positive numbers" if positive else "numbers"
        raise DataError(f"{what} is {_shown(value)}, expected {length} finite {kind}")
    return [float(v) for v in value]


def class_names_of(value: Any, what: str, num_classes: int | None = None) -> list[str]:
    """Checked class names: a list of distinct non-empty strings (``num_classes`` of them if given)."""
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(name, str) and name for name in value)
        or len(set(value)) != len(value)
    ):
        raise DataError(f"{what} is {_shown(value)}, expected a list of distinct class names")
    if num_classes is not None and len(value) != num_classes:
        raise DataError(f"{what} has {len(value)} names for {num_classes} classes")
    return list(value)


def image_settings_of(value: Any, what: str) -> dict[str, Any]:
    """Checked image settings: size (pixels), mode (gray / rgb) and fit (pad / crop)."""
    image = _mapping(value, what)
    size = _int_in(image.get("size"), f"{what}.size", *IMAGE_SIZE_RANGE)
    if image.get("mode") not in MODE_CHANNELS:
        raise DataError(f"{what}.mode is {_shown(image.get('mode'))}, expected gray or rgb")
    if image.get("fit") not in FITS:
        raise DataError(f"{what}.fit is {_shown(image.get('fit'))}, expected pad or crop")
    return {"size": size, "mode": image["mode"], "fit": image["fit"]}


def is_factory_name(name: Any) -> bool:
    """Whether ``name`` has the ``package.module:factory`` form (a factory to import and call)."""
    from imgpipe.learn.model_names import FACTORY_RE

    return isinstance(name, str) and bool(FACTORY_RE.match(name))


def factory_names(given: str | Iterable[str] | None) -> tuple[str, ...]:
    """The factory names a caller trusts: one name, several, or none."""
    if given is None:
        return ()
    return (given,) if isinstance(given, str) else tuple(given)


def configured_factories(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``package.module:factory`` names a workflow config trains with: its model files may name them.

    ``model.name`` and the ``model.name`` values of ``sweep.grid``: the user's
    own config, never a file's contents.
    """
    names = [(config.get("model") or {}).get("name")]
    names += list(((config.get("sweep") or {}).get("grid") or {}).get("model.name") or [])
    return tuple(dict.fromkeys(name for name in names if is_factory_name(name)))


def checked_model_name(name: Any, factories: Iterable[str] = ()) -> str:
    """``name`` if imgpipe builds it without running anything the file names, else a DataError.

    smallcnn, a torchvision classification model (torchvision's own registry),
    ``timm/<name>`` (timm's registry), or a ``package.module:factory`` the
    caller names in ``factories`` (``--model-factory``, the user's config).
    """
    from imgpipe.learn.model_names import torchvision_names

    if not isinstance(name, str):
        raise DataError(f"model_cfg.name is {_shown(name)}, expected a model name")
    if name == "smallcnn" or name in torchvision_names():
        return name
    if name.startswith("timm/"):
        import timm

        arch = name.removeprefix("timm/")
        # Registry names (an optional .tag picks pretrained settings, never read here);
        # no hub prefixes or paths.
        if re.fullmatch(r"\w+(\.\w+)?", arch) and timm.is_model(arch):
            return name
        raise DataError(f"model_cfg.name {_shown(name)}: timm has no such model")
    if is_factory_name(name):
        trusted = factory_names(factories)
        if name in trusted:
            return name
        if trusted:
            raise DataError(
                f"the model was built by the factory {name}, but the factory named at load "
                f"time is {', '.join(trusted)}: they must be the same"
            )
        raise DataError(
            f"the model was built by your own factory {name}: a model file never chooses "
            f"code to run, name it at load time (imgpipe predict --model-factory {name}, "
            "load_model(..., model_factory=...)) or use the exported model.onnx"
        )
    raise DataError(
        f"model_cfg.name {_shown(name)} is no model imgpipe builds (smallcnn, a torchvision "
        "classification model, timm/<name>, or a package.module:factory named at load time)"
    )


def _checked_model_cfg(value: Any, factories: Iterable[str]) -> dict[str, Any]:
    # What a model file written before a model_cfg key existed was built with (file versions,
    # not config defaults: those live in config/schema.yaml).
    cfg = {**OLDER_FILES_MODEL_CFG, **_mapping(value, "model_cfg")}
    checked: dict[str, Any] = {"name": checked_model_name(cfg.get("name"), factories)}
    channels = cfg["channels"]
    if (
        not isinstance(channels, list | tuple)
        or not 1 <= len(channels) <= 32
        or not all(_is_int(c) and 1 <= c <= 8192 for c in channels)
    ):
        raise DataError(f"model_cfg.channels is {_shown(channels)}, expected positive widths")
    checked["channels"] = list(channels)
    dropout = cfg["dropout"]
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise DataError(f"model_cfg.dropout is {_shown(dropout)}, expected a number in [0, 1)")
    checked["dropout"] = float(dropout)
    normalize = cfg["normalize"]
    if normalize is not None and normalize not in NORMALIZE_MODES:
        raise DataError(f"model_cfg.normalize is {_shown(normalize)}, expected auto/imagenet/data")
    checked["normalize"] = normalize
    stem = cfg["stem"]
    if stem not in SMALL_CNN_STEMS:
        raise DataError(f"model_cfg.stem is {_shown(stem)}, expected auto or none")
    checked["stem"] = stem
    # The trained weights come from the file's state dict: never read a weights file.
    checked["weights"] = None
    return checked


def safe_hparams(hparams: Any, factories: Iterable[str] = ()) -> dict[str, Any]:
    """A checkpoint's hyper-parameters, every field type- and range-checked, ready for ImageClassifier.

    Raises a DataError (one line, naming the field) for anything imgpipe did
    not write: an unknown key, a model name outside the closed set, a size or
    a class count that is no integer in range, class names that are no
    strings, normalisation statistics of the wrong length.
    """
    hp = _mapping(hparams, "hyper_parameters")
    unknown = sorted(set(hp) - set(HPARAM_KEYS))
    if unknown:
        raise DataError(f"hyper_parameters has keys imgpipe never writes: {_shown(unknown)}")
    missing = [key for key in REQUIRED_HPARAMS if key not in hp]
    if missing:
        raise DataError(f"hyper_parameters lacks {', '.join(missing)}")
    num_classes = _int_in(hp["num_classes"], "num_classes", 2, MAX_CLASSES)
    in_channels = hp["in_channels"]
    if not _is_int(in_channels) or in_channels not in (1, 3):
        raise DataError(f"in_channels is {_shown(in_channels)}, expected 1 or 3")
    image_size = _int_in(hp["image_size"], "image_size", *IMAGE_SIZE_RANGE)
    safe: dict[str, Any] = {
        "model_cfg": _checked_model_cfg(hp["model_cfg"], factories),
        # Training settings: kept as they are (plain values), never run or built.
        "train_cfg": _mapping(hp.get("train_cfg"), "train_cfg", optional=True),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "mean": _numbers(hp["mean"], "mean", in_channels),
        "std": _numbers(hp["std"], "std", in_channels, positive=True),
        "augment_cfg": _mapping(hp.get("augment_cfg"), "augment_cfg", optional=True),
        "class_names": None,
        "image_cfg": None,
        "class_weights": None,
        # The calibration temperature (imgpipe.learn.calibration): a file without one predicts as
        # it was trained (T = 1), so files older than calibration still load.
        "temperature": checked_temperature(hp.get("temperature", 1.0)),
    }
    if hp.get("class_names") is not None:
        safe["class_names"] = class_names_of(hp["class_names"], "class_names", num_classes)
    if hp.get("image_cfg") is not None:
        image = image_settings_of(hp["image_cfg"], "image_cfg")
        if image["size"] != image_size or MODE_CHANNELS[image["mode"]] != in_channels:
            raise DataError(
                f"image_cfg {_shown(image)} does not match image_size {image_size} and "
                f"in_channels {in_channels}"
            )
        safe["image_cfg"] = image
    if hp.get("class_weights") is not None:
        safe["class_weights"] = _numbers(hp["class_weights"], "class_weights", num_classes)
    return safe


def checked_metadata(meta: Any, what: str = METADATA_KEY) -> dict[str, Any]:
    """A model file's (or sidecar's) ``imgpipe`` entry with what prediction reads from it checked."""
    entry = _mapping(meta, what)
    entry["class_names"] = class_names_of(entry.get("class_names"), f"{what}.class_names")
    entry["image"] = image_settings_of(entry.get("image"), f"{what}.image")
    clean = _mapping(entry.get("clean"), f"{what}.clean", optional=True)
    for key in QUALITY_KEYS:
        value = clean.get(key)
        if value is not None and (not _is_number(value) or value < 0):
            raise DataError(f"{what}.clean.{key} is {_shown(value)}, expected a number >= 0")
    if entry.get("max_pixels") is not None:
        _int_in(entry["max_pixels"], f"{what}.max_pixels", 1, 2**62)
    extensions = entry.get("extensions")
    if extensions is not None and (
        not isinstance(extensions, list | tuple)
        or not all(isinstance(e, str) and e.startswith(".") for e in extensions)
    ):
        raise DataError(f"{what}.extensions is {_shown(extensions)}, expected ['.png', ...]")
    return entry


def smallcnn_weight_count(in_channels: int, channels: Iterable[int]) -> int:
    """Number of convolution weights of a small CNN: a lower bound of its state dict's size.

    The blocks' weights without a stem; a stem (``stem: auto`` from 64 px) only adds to them.
    """
    count, previous = 0, in_channels
    for width in channels:
        count += 9 * (previous * width + width * width)
        previous = width
    return count


def validate_model_file(
    state: Any, model_factory: str | Iterable[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(hyper-parameters, state dict, metadata) of a loaded checkpoint, checked before anything is built.

    ``state`` is what ``torch.load(weights_only=True)`` returned. Nothing the
    file names is imported or called: the model is one imgpipe builds by name
    (see ``checked_model_name``), or the factory the caller names in
    ``model_factory``. Raises a one-line DataError for a file that is no
    imgpipe model file or says something imgpipe never writes.
    """
    import torch

    if not isinstance(state, Mapping) or "state_dict" not in state:
        raise DataError("not an imgpipe model file (no state_dict: not a checkpoint)")
    if "hyper_parameters" not in state or not isinstance(state["hyper_parameters"], Mapping):
        raise DataError("not an imgpipe model file (no hyper_parameters)")
    if "model_cfg" not in state["hyper_parameters"]:
        raise DataError(
            "not an imgpipe model file (a checkpoint whose hyper_parameters have no model_cfg: "
            "another program's, e.g. another Lightning module's)"
        )
    weights = state["state_dict"]
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()
    ):
        raise DataError("state_dict is not a mapping of names to tensors")
    hparams = safe_hparams(state["hyper_parameters"], factory_names(model_factory))
    cfg = hparams["model_cfg"]
    if is_factory_name(model_factory) and cfg["name"] != model_factory:
        raise DataError(
            f"the factory {model_factory} is named at load time, but the file's model is "
            f"{cfg['name']} (built by imgpipe, no factory): leave --model-factory out"
        )
    if cfg["name"] == "smallcnn":
        # Refuse before building what the file's tensors could not fill (memory stays bounded).
        held = sum(int(v.numel()) for v in weights.values())
        needed = smallcnn_weight_count(hparams["in_channels"], cfg["channels"])
        if needed > held:
            raise DataError(
                f"model_cfg.channels {cfg['channels']} need {needed} weights, "
                f"the state_dict holds {held}"
            )
    given = state.get(METADATA_KEY)
    meta = checked_metadata(given if given else model_metadata(hparams))
    image = meta["image"]
    expected_names = hparams["class_names"] or [str(c) for c in range(hparams["num_classes"])]
    if meta["class_names"] != expected_names:
        raise DataError(f"{METADATA_KEY}.class_names do not match the hyper_parameters'")
    if image["size"] != hparams["image_size"] or (
        MODE_CHANNELS[image["mode"]] != hparams["in_channels"]
    ):
        raise DataError(
            f"{METADATA_KEY}.image {image} does not match image_size {hparams['image_size']} "
            f"and in_channels {hparams['in_channels']}"
        )
    return hparams, dict(weights), meta


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)``; a file it cannot read is a one-line DataError.

    weights_only refuses every pickled object but tensors and plain values, so
    nothing runs while the file is read; its refusal becomes the message.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise DataError(
                "cannot be read as a model file: not a checkpoint that loads with "
                "torch.load(weights_only=True)"
            ) from None
        raise DataError(
            f"holds a pickled Python object ({found.group(1)}) that could run code when "
            "loaded: refused (an imgpipe model file holds tensors and plain values only)"
        ) from None
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one line
        # torch.save writes a zip archive: one that does not read is cut short or damaged.
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
        first = str(err).splitlines()[0] if str(err) else ""
        if zipped:
            reason = f"truncated or corrupt ({type(err).__name__}: {_shown(first, 80)})"
        else:
            reason = "not a PyTorch checkpoint (torch.save writes a zip archive; this is none)"
        raise DataError(f"cannot be read as a model file: {reason}") from None
