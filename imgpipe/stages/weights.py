"""The weights stage (rule fetch_weights): fetch a named pretrained file once, before training."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from imgpipe.core.atomic import file_sha256, write_json
from imgpipe.learn.pretrained import PretrainedFile, fetch
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_fetch_weights(job: StageJob) -> dict[str, Any]:
    """The fetch_weights stage: the file in the cache (fetched if missing), recorded in a JSON."""
    spec = PretrainedFile(**job.params["weights"])
    path, downloaded = fetch(spec)
    record = {
        **asdict(spec),
        "path": str(path),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "downloaded": downloaded,
    }
    log.info(
        "%s %s: %s (sha256 %s)",
        "fetched" if downloaded else "cached",
        spec.slug,
        path,
        record["sha256"],
    )
    write_json(record, job.output["record"])
    return record
