"""The augment stage (rule augment): materialised augmentation copies of the training images, and a preview."""

from __future__ import annotations

import logging

from imgpipe.core.errors import DataError
from imgpipe.images.augment import augment_pool
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_augment(job: StageJob) -> int:
    """The augment stage: the policy's preview, and the materialised views when augment.copies > 0."""
    from imgpipe.data.dataset import load_index, open_images
    from imgpipe.data.split import load_split, training_pool

    pool = training_pool(load_index(job.input["index"]), load_split(job.input["split"]))
    if pool.empty:
        raise DataError("the split has no train or val image to augment")
    images = open_images(pool)
    return augment_pool(images, pool["id"].to_numpy(), job.params["augment"], job.output)
