"""The config's defaults, in one place: config/schema.yaml, and typed views of its sections.

The schema holds every default. ``fill_defaults`` fills a config (or one
section) with them the way Snakemake's ``validate(config, schema,
set_default=True)`` does at start-up, and each section code reads has a frozen
dataclass built with ``from_config`` from a filled section. The dataclasses
carry no defaults of their own: a key missing from a section is a bug (a caller
that skipped the filling), and raises instead of falling back to a second copy
of the default.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Self

from imgpipe.workflow.config import ConfigError, DefaultFillingValidator, load_schema, subschema

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


# config/schema.yaml, read once per process (on first use: importing this module reads nothing).
@functools.cache
def _schema() -> dict:
    return load_schema(SCHEMA_PATH)


def fill_defaults(config: Mapping, node: Mapping | None = None, check: bool = True) -> dict:
    """A copy of ``config`` with every default of ``node`` (the whole schema when None) filled in.

    With ``check``, raises ConfigError, naming the keys, when the copy breaks the schema.
    """
    filled = copy.deepcopy(dict(config))
    errors = sorted(
        DefaultFillingValidator(node if node is not None else _schema()).iter_errors(filled),
        key=lambda error: list(map(str, error.absolute_path)),
    )
    if errors and check:
        raise ConfigError(
            "invalid configuration:\n  "
            + "\n  ".join(f"{_dotted(e.absolute_path)}: {e.message}" for e in errors)
        )
    return filled


def _dotted(path: Any) -> str:
    return ".".join(map(str, path)) or "<section>"


def section_schema(section: str) -> dict:
    """The schema of one top-level section (``train``), with the root's ``$defs``."""
    node = subschema(_schema(), section)
    if node is None:
        raise KeyError(f"config/schema.yaml has no section {section!r}")
    return node


def filled(section: str, partial: Mapping | None = None, check: bool = False) -> dict:
    """Section ``section`` of a config: ``partial``'s values, the schema's defaults for the rest.

    Not checked by default: a job's sections were checked at start-up, and code adds keys of its
    own to them (train's ``schedule_images``) that the schema does not know.
    """
    return fill_defaults(partial or {}, section_schema(section), check=check)


def section_defaults(section: str) -> dict:
    """Every default of one section (``section_defaults("train")["lr"]``); required keys stay absent."""
    return fill_defaults({}, section_schema(section), check=False)


def schema_keys() -> set[str]:
    """Every key name config/schema.yaml defines: the sections and the keys inside them."""
    keys: set[str] = set()
    for name, node in _schema()["properties"].items():
        keys.add(name)
        keys.update(node.get("properties", {}))
    return keys


class _FromSection:
    """``from_config`` for the section dataclasses: one field per key, no default of their own."""

    @classmethod
    def from_config(cls, section: Mapping) -> Self:
        """Build from a defaults-filled section; a missing key raises (it is a bug, not a default)."""
        missing = [f.name for f in fields(cls) if f.name not in section]
        if missing:
            raise KeyError(
                f"{cls.__name__}: the section lacks {', '.join(missing)} "
                "(fill it with imgpipe.workflow.settings.filled first)"
            )
        return cls(**{f.name: section[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class DataSettings(_FromSection):
    """The ``data:`` section."""

    root: str
    test_root: str | None
    extensions: list[str]
    follow_symlinks: bool


@dataclass(frozen=True)
class ImageSettings(_FromSection):
    """The ``image:`` section (``auto`` not yet resolved: imgpipe.data.image_settings does that)."""

    size: int | str
    mode: str
    fit: str


@dataclass(frozen=True)
class AugmentSettings(_FromSection):
    """The ``augment:`` section."""

    on_device: bool
    copies: int
    seed: int
    crop_area: list[float]
    crop_ratio: list[float]
    rotation: float
    hflip: bool
    vflip: bool
    scale: list[float]
    translate: float
    brightness: float
    contrast: float


@dataclass(frozen=True)
class ModelSettings(_FromSection):
    """The ``model:`` section."""

    name: str
    channels: list[int]
    dropout: float
    stem: str
    weights: str | None
    normalize: str


@dataclass(frozen=True)
class TrainSettings(_FromSection):
    """The ``train:`` section."""

    max_epochs: int
    min_steps: int
    batch_size: int | str
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    l1: float
    label_smoothing: float
    schedule: str
    freeze: str | int
    backbone_lr_mult: float
    class_weights: str
    sampler: str
    early_stopping_patience: int
    monitor: str
    seed: int
    deterministic: bool
    cpu_devices: int
    num_nodes: int
    gpus_per_node: int
    precision: str
    num_workers: int
    threads: int | None


@dataclass(frozen=True)
class ClusterSettings(_FromSection):
    """The ``cluster:`` section."""

    features: list[str]
    n_clusters: int | None
    n_init: int
    seed: int
    pca_dim: int | None
    large_above: int
    k_values: list[int]
    tsne: bool
    export: str


@dataclass(frozen=True)
class ExportSettings(_FromSection):
    """The ``export:`` section."""

    opset: int
    quantize: str


# Section name -> its dataclass (tests check each one's fields against the schema).
SECTIONS: dict[str, type[_FromSection]] = {
    "data": DataSettings,
    "image": ImageSettings,
    "augment": AugmentSettings,
    "model": ModelSettings,
    "train": TrainSettings,
    "cluster": ClusterSettings,
    "export": ExportSettings,
}
