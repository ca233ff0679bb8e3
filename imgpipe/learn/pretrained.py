"""Pretrained weights by name: ``model.weights: imagenet`` or a timm tag, read from the library's cache.

``imagenet`` means the library's default pretrained weights for the model:
torchvision's ``<Model>_Weights.DEFAULT``, or timm's default tag of the
architecture. ``timm/<arch>.<tag>`` (``timm/resnet18.a1_in1k``) names one of
timm's tags for ``model.name: timm/<arch>``; ``timm/<arch>`` alone is its
default tag. Any other value is a local file's path (write ``./timm/...`` for a
folder that happens to be called ``timm``).

Each name resolves to one file in the library's own cache, where the library
itself would put it:

* torchvision (and timm weights published only as a URL): torch.hub's
  ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``;
* timm weights on the Hugging Face hub: the Hugging Face cache
  (``$HF_HOME/hub/models--timm--<arch>.<tag>/snapshots/<revision>/model.safetensors``),
  found and fetched with huggingface_hub's own API.

Training only ever reads the cache (:func:`cached_file`); the workflow's
``fetch_weights`` localrule downloads a missing file once (:func:`fetch`), on the
machine that runs Snakemake. With ``HF_HUB_OFFLINE=1`` a missing file stops the
run at start-up (:func:`missing_offline_error`).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgpipe.core.errors import DataError

if TYPE_CHECKING:
    pass

IMAGENET = "imagenet"
TIMM_PREFIX = "timm/"
# timm's file names on the hub, in the order timm itself tries them.
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
# huggingface_hub's spelling of a true environment switch (constants._is_true).
TRUE_WORDS = {"1", "ON", "YES", "TRUE"}
# torch.hub's check: the hex digits after the last '-' of a file name start its sha256.
HASH_RE = re.compile(r"-([a-f0-9]*)\.")
# torchvision's DenseNet files keep old module names ("norm.1" for "norm1"); torchvision renames
# them as it loads a file (torchvision.models.densenet._load_state_dict), and so does imgpipe.
DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass(frozen=True)
class PretrainedFile:
    """Where a named weights value lives: the library, the file and how to fetch it."""

    model: str  # model.name
    weights: str  # model.weights as given
    source: str  # "torchvision", "timm" (Hugging Face hub) or "timm-url" (torch.hub cache)
    slug: str  # results/weights/<slug>.json
    filename: str  # the file's name in the cache
    url: str  # where it is downloaded from
    repo_id: str = ""  # Hugging Face repository (source "timm")

    @property
    def cache_dir(self) -> Path:
        """The folder the library keeps the file in (for the hub: the repository's cache folder)."""
        if self.source == "timm":
            return hf_cache_dir() / f"models--{self.repo_id.replace('/', '--')}"
        return torch_checkpoints_dir()


def is_named(weights: Any) -> bool:
    """Whether ``model.weights`` names library weights (``imagenet``, ``timm/...``) rather than a file."""
    return isinstance(weights, str) and (weights == IMAGENET or weights.startswith(TIMM_PREFIX))


# ---------------------------------------------------------------- caches and switches


def torch_checkpoints_dir() -> Path:
    """torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``), read now from the environment."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub.constants computes it, but read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """Whether the Hugging Face offline switch ``HF_HUB_OFFLINE`` is on (imgpipe then never fetches)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_WORDS


def current_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """A weights file's keys as the library's models name them today (old DenseNet keys renamed)."""
    return {DENSENET_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()}


# ---------------------------------------------------------------- names -> files


def _timm_arch(name: str) -> str | None:
    return name.removeprefix(TIMM_PREFIX) if name.startswith(TIMM_PREFIX) else None


def _torchvision_file(name: str, weights: str) -> PretrainedFile:
    from torchvision import models as tvm

    from imgpipe.learn.model_names import torchvision_names

    if name not in torchvision_names():
        raise DataError(
            f"model.weights: {weights} needs a torchvision model or timm/<name>; model.name "
            f"{name} has no pretrained weights (give a weights file's path instead)"
        )
    default = tvm.get_model_weights(name).DEFAULT
    if default is None:  # pragma: no cover - every torchvision classifier has weights today
        raise DataError(f"model.weights: {weights}: torchvision has no weights for {name}")
    filename = default.url.rsplit("/", 1)[-1]
    return PretrainedFile(
        model=name,
        weights=weights,
        source="torchvision",
        slug=f"torchvision-{filename.rsplit('.', 1)[0]}",
        filename=filename,
        url=default.url,
    )


def _timm_tag_error(arch: str, weights: str, name: str) -> DataError:
    import difflib

    import timm

    tags = timm.list_pretrained(f"{arch}.*")
    close = difflib.get_close_matches(weights.removeprefix(TIMM_PREFIX), tags, n=5, cutoff=0.6)
    hint = f"; close: {', '.join(TIMM_PREFIX + t for t in close)}" if close else ""
    return DataError(f"model.weights: timm has no pretrained tag {weights} for {name}{hint}")


def _timm_file(name: str, weights: str) -> PretrainedFile:
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch = _timm_arch(name) or ""
    if weights == IMAGENET or weights == name:
        wanted = arch
    else:
        wanted = weights.removeprefix(TIMM_PREFIX)
        tag_arch, _ = split_model_name_tag(wanted)
        if tag_arch != arch:
            raise DataError(
                f"model.weights: {weights} is a tag of timm/{tag_arch}, not of model.name {name}"
            )
    try:
        cfg = get_pretrained_cfg(wanted)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise _timm_tag_error(arch, weights, name)
    tag = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else str(cfg.architecture)
    if cfg.hf_hub_id:
        repo_id = cfg.hf_hub_id.split("@", 1)[0]
        filename = cfg.hf_hub_filename or HF_FILENAMES[0]
        return PretrainedFile(
            model=name,
            weights=weights,
            source="timm",
            slug=f"timm-{tag}",
            filename=filename,
            url=f"https://huggingface.co/{repo_id}",
            repo_id=repo_id,
        )
    filename = cfg.url.rsplit("/", 1)[-1]
    return PretrainedFile(
        model=name,
        weights=weights,
        source="timm-url",
        slug=f"timm-{tag}",
        filename=filename,
        url=cfg.url,
    )


def resolve(name: str, weights: str) -> PretrainedFile:
    """The cache file ``model.weights`` names for ``model.name``; a DataError (one line) if none fits."""
    if not is_named(weights):
        raise ValueError(f"{weights!r} is a file path, not a weights name")
    arch = _timm_arch(name)
    if weights.startswith(TIMM_PREFIX) and arch is None:
        raise DataError(
            f"model.weights: {weights} is a timm tag: it needs model.name "
            f"timm/<arch> (here {name}); for torchvision's own weights write imagenet"
        )
    if arch is not None:
        from imgpipe.learn.model_names import timm_name_error

        if timm_name_error(arch) is not None:
            raise DataError(f"model.weights: {weights}: timm has no model {arch!r}")
        return _timm_file(name, weights)
    return _torchvision_file(name, weights)


def weights_error(name: Any, weights: Any) -> str | None:
    """Why ``model.weights`` cannot name weights for ``model.name`` (None when it can, or is a path)."""
    if not is_named(weights) or not isinstance(name, str):
        return None
    try:
        resolve(name, weights)
    except DataError as err:
        return str(err)
    return None


# ---------------------------------------------------------------- the config's names


def named_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every (model.name, model.weights) pair with named weights a run may train: the model
    section's, with the sweep's model.name / model.weights values (grid values, or a random
    sweep's choices) in their place. ``config`` has the schema's defaults filled in (at
    start-up, imgpipe.workflow.config.model_errors fills them before checking)."""
    model, sweep = config["model"], config["sweep"]
    names, weights = [model["name"]], [model["weights"]]
    if sweep["enabled"]:
        swept = sweep["grid"] if sweep["method"] == "grid" else sweep["ranges"]
        names = list(swept.get("model.name", names))
        weights = list(swept.get("model.weights", weights))
    pairs = itertools.product(names, weights)
    return sorted({(n, w) for n, w in pairs if isinstance(n, str) and is_named(w)})


def config_weights_errors(config: Mapping[str, Any]) -> list[str]:
    """One line per named weights value that fits no model it is paired with (start-up check)."""
    lines = []
    for name, weights in named_pairs(config):
        error = weights_error(name, weights)
        if error:
            lines.append(error)
    return lines


def needed_files(config: Mapping[str, Any]) -> dict[str, PretrainedFile]:
    """The cache files a run needs, by slug (empty without named weights)."""
    files = (resolve(name, weights) for name, weights in named_pairs(config))
    return {f.slug: f for f in files}


# ---------------------------------------------------------------- the cache


def hub_filenames(spec: PretrainedFile) -> tuple[str, ...]:
    """The hub files timm would read, in its order: a tag's own file, else safetensors then .bin."""
    return HF_FILENAMES if spec.filename in HF_FILENAMES else (spec.filename,)


def cached_file(spec: PretrainedFile) -> Path | None:
    """The file in the library's cache, or None when it is not there (never downloads)."""
    if spec.source != "timm":
        path = torch_checkpoints_dir() / spec.filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for filename in hub_filenames(spec):
        found = try_to_load_from_cache(spec.repo_id, filename, cache_dir=hf_cache_dir())
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def expected_path(spec: PretrainedFile) -> str:
    """Where the file goes, as a user would place it by hand."""
    if spec.source == "timm":
        return str(spec.cache_dir / "snapshots" / "<revision>" / spec.filename)
    return str(spec.cache_dir / spec.filename)


def placing_hint(spec: PretrainedFile) -> str:
    """How to get the file onto a machine without network."""
    if spec.source == "timm":
        return (
            f"on a machine with network access run `hf download {spec.repo_id} {spec.filename}` "
            f"and copy the models--{spec.repo_id.replace('/', '--')} folder of its Hugging Face "
            "cache (~/.cache/huggingface/hub) there"
        )
    return f"download it from {spec.url} on a machine with network access and copy it there"


def missing_message(spec: PretrainedFile, why: str = "no network") -> str:
    """The one line for a file that is not in the cache and cannot be fetched."""
    where = (
        f"{spec.cache_dir}/ (as {expected_path(spec)})"
        if spec.source == "timm"
        else f"{spec.cache_dir}/"
    )
    return (
        f"model.weights: {spec.weights} for {spec.model} needs {spec.filename} in {where}; "
        f"{why}: {placing_hint(spec)}"
    )


def local_file(name: str, weights: str) -> Path:
    """The cached file of named weights, for training: a DataError (one line) when it is missing."""
    spec = resolve(name, weights)
    found = cached_file(spec)
    if found is None:
        raise DataError(
            missing_message(
                spec,
                "it is not in this machine's cache (the fetch_weights rule "
                "puts it there on the machine running Snakemake; nodes must share it)",
            )
        )
    return found


def missing_offline_error(files: Mapping[str, PretrainedFile]) -> str | None:
    """With HF_HUB_OFFLINE set, the line for the first needed file missing from the cache."""
    if not offline():
        return None
    for spec in files.values():
        if cached_file(spec) is None:
            return missing_message(spec, "no network (HF_HUB_OFFLINE is set)")
    return None


# ---------------------------------------------------------------- fetching


def _download_torch_hub(spec: PretrainedFile) -> Path:
    import torch.hub

    target = torch_checkpoints_dir() / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    # torch.hub's own download: a temporary file, moved into place once complete. torchvision's
    # file names carry the start of their sha256 (its naming rule): checked; timm's URLs are not
    # checked, as timm itself does not.
    match = HASH_RE.search(spec.filename) if spec.source == "torchvision" else None
    torch.hub.download_url_to_file(
        spec.url, str(target), hash_prefix=match.group(1) if match else None, progress=False
    )
    return target


def _download_hf(spec: PretrainedFile) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    error: Exception | None = None
    for filename in hub_filenames(spec):
        try:
            return Path(hf_hub_download(spec.repo_id, filename, cache_dir=hf_cache_dir()))
        except EntryNotFoundError as err:  # timm publishes .safetensors or .bin: try the next
            error = err
    raise DataError(missing_message(spec, f"fetch failed ({error})"))


def fetch(spec: PretrainedFile) -> tuple[Path, bool]:
    """The cached file, downloaded first if missing: (path, whether it was downloaded).

    A failed download (no network, no such file) raises a DataError with the one line.
    """
    found = cached_file(spec)
    if found is not None:
        return found, False
    if offline():
        raise DataError(missing_message(spec, "no network (HF_HUB_OFFLINE is set)"))
    try:
        path = _download_hf(spec) if spec.source == "timm" else _download_torch_hub(spec)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any failed download gets the same one line
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(
            missing_message(spec, f"fetch failed ({type(err).__name__}: {first})")
        ) from err
    return path, True
