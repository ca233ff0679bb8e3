"""The clean stage (rule clean): decide which ingested images to keep, and record every rejection with its reason."""

from __future__ import annotations

import logging

from imgpipe.images.quality import CleanSettings, clean_shards
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_clean(job: StageJob) -> dict:
    """The clean stage: decide on every listed file of every shard; write index, rejections, summary."""
    settings = CleanSettings.from_config(job.params["clean"])
    result = clean_shards(
        job.input["stats"],
        job.input["images"],
        job.output,
        settings,
        job.params["examples_per_reason"],
    )
    log.info("clean: %s", result["total"])
    log.info("rejected per reason: %s", result["rejected_per_reason"])
    log.info("near duplicates: %s", result["near_duplicates"])
    return result
