"""The ingest stages (rules list_images, image_settings, ingest_shard): list the files, settle image size and mode, decode and measure."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from imgpipe.core.atomic import write_csv, write_json
from imgpipe.data.image_settings import describe, resolve_settings
from imgpipe.data.ingest import ingest_one_shard
from imgpipe.data.listing import list_images
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_list_images(job: StageJob) -> pd.DataFrame:
    """The list_images stage: one row per file under data.root (and data.test_root) in files.csv."""
    files = list_images(
        job.params["root"],
        job.params["extensions"],
        job.params["test_root"],
        follow_symlinks=bool(job.params["follow_symlinks"]),
    )
    write_csv(files, job.output["listing"])
    counts = files.groupby(["source", "status"]).size().to_dict()
    log.info("listed %d files: %s", len(files), counts)
    for reason, count in files.loc[files["status"] == "rejected", "reason"].value_counts().items():
        log.info("listing rejected %d file(s) as %s", count, reason)
    return files


def run_image_settings(job: StageJob) -> dict[str, Any]:
    """The image_settings stage: resolve image.size / image.mode into results/ingest/image.json."""
    from imgpipe.data.listing import load_files

    files = load_files(job.input["listing"])
    paths = files.loc[files["status"] == "ok", "path"].tolist()
    settings = resolve_settings(job.params["image"], paths)
    write_json(settings, job.output["settings"])
    log.info("%s", describe(settings))
    return settings


def run_ingest_shard(job: StageJob) -> pd.DataFrame:
    """The ingest_shard stage: decode, measure and resize this shard's share of the listing."""
    from imgpipe.data.image_settings import load_settings

    shard = int(job.wildcards["shard"])
    stats = ingest_one_shard(
        job.input["listing"],
        shard,
        job.params["shards"],
        load_settings(job.input["image"]),  # image.size / mode resolved (auto -> inferred)
        job.params["max_pixels"],
        job.output["stats"],
        job.output["images"],
    )
    counts = stats["reason"].where(stats["status"] == "rejected").value_counts().to_dict()
    log.info("shard %d: %d kept, rejected %s", shard, int((stats["status"] == "ok").sum()), counts)
    return stats
