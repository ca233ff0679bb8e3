"""One training run as both paths need it: its data and its description.

The local path (``imgpipe.learn.jobs``) and every srun rank (``imgpipe.learn.launch``)
open the data with :func:`load_training_data` and train the one
:class:`TrainingRun` through ``imgpipe.learn.fit.fit_run``. Kept free of torch
and of both callers, so that neither imports the other for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.core.atomic import read_csv
from imgpipe.core.errors import DataError
from imgpipe.data.dataset import NpyRows, ShardImages, label_codes, load_index, open_images
from imgpipe.data.split import load_split, role_ids

# Set in every rank's environment by imgpipe.learn.launch: a rank never launches
# ranks itself, and only such a rank attaches to SLURM's tasks (imgpipe.learn.fit).
LAUNCHED_VAR = "IMGPIPE_LAUNCHED_RANK"


@dataclass
class TrainingData:
    """The clean index's images (read from the shards on demand), labels, roles and augmented views."""

    index: pd.DataFrame
    images: ShardImages
    labels: np.ndarray
    roles: pd.Series
    aug_images: NpyRows | None
    aug_sources: np.ndarray

    def ids(self, *roles: str) -> np.ndarray:
        """Sorted ids of the images whose split role is one of ``roles``."""
        return role_ids(self.roles, *roles)


def load_training_data(inputs: Mapping[str, str]) -> TrainingData:
    """Open the training data named by ``inputs`` (index, split, aug_images, aug_index): nothing is read yet."""
    index = load_index(inputs["index"])
    aug_index = read_csv(inputs["aug_index"])
    aug_images = NpyRows(inputs["aug_images"]) if len(aug_index) else None
    return TrainingData(
        index=index,
        images=open_images(index),
        labels=label_codes(index),
        roles=load_split(inputs["split"]),
        aug_images=aug_images,
        aug_sources=aug_index["source_id"].to_numpy(dtype=np.int64),
    )


@dataclass(frozen=True)
class TrainingRun:
    """One training run as fit needs it, besides the images, the ids and the devices.

    Built once per job (:func:`training_run`) and handed to the local path
    (``imgpipe.learn.jobs.run_training``) and, as JSON in the job file, to every srun rank
    (``imgpipe.learn.launch``); both train through ``imgpipe.learn.fit.fit_run``, so what the model
    file records (class names, image settings, augmentation) cannot drift
    between them.
    """

    model: dict
    train: dict
    augment: dict
    # size, mode and fit as ingest made the arrays (results/ingest/image.json: image_settings_of).
    image: dict
    out_dir: str
    resume_dir: str
    tensorboard_dir: str | None = None
    # A run without validation images takes this temperature (imgpipe.learn.calibration),
    # fitted by the sweep's winning trial; None: fitted on the run's own validation images.
    temperature: float | None = None
    temperature_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> TrainingRun:
        """The run :meth:`to_dict` wrote; ValueError naming what is missing or unknown."""
        names = {field.name for field in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing, unknown = required - set(fields), set(fields) - names
        if missing or unknown:
            raise ValueError(f"training run: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(**fields)

    def absolute(self) -> TrainingRun:
        """The same run with absolute folders (srun ranks may start elsewhere)."""
        return dataclasses.replace(
            self,
            out_dir=str(Path(self.out_dir).resolve()),
            resume_dir=str(Path(self.resume_dir).resolve()),
            tensorboard_dir=(
                str(Path(self.tensorboard_dir).resolve()) if self.tensorboard_dir else None
            ),
        )


def image_settings_of(path: str | Path) -> dict[str, Any]:
    """The image settings a model trains with: size, mode and fit of results/ingest/image.json.

    The one source: ingest made the shard arrays with exactly these (``auto``
    resolved from the data), and the model file records them.
    """
    from imgpipe.data.image_settings import load_settings

    settings = load_settings(path)
    return {
        "size": int(settings["size"]),
        "mode": str(settings["mode"]),
        "fit": str(settings["fit"]),
    }


def check_images_match(image: Mapping[str, Any], shape: tuple[int, ...]) -> None:
    """DataError when the arrays' (N, S, S, C) shape is not what image.json says ingest made."""
    channels = 3 if image["mode"] == "rgb" else 1
    if tuple(shape[1:]) != (image["size"], image["size"], channels):
        raise DataError(
            f"the shard arrays hold images of shape {tuple(shape[1:])}, but results/ingest/image.json "
            f"says size {image['size']} and mode {image['mode']}: rerun ingest (the arrays are stale)"
        )
