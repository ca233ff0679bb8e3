"""The report stage (rule report): the results page, its headline numbers and this run's row in runs.csv."""

from __future__ import annotations

import logging
import os
from typing import Any

from imgpipe.report.page import write_report
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_report(job: StageJob) -> dict[str, Any]:
    """The report stage: index.html and summary.json from every result file; this run in runs.csv."""
    inputs = {
        name: str(value) if isinstance(value, str | os.PathLike) else [str(v) for v in value]
        for name, value in job.input.items()
    }
    numbers = write_report(
        inputs,
        job.output["html"],
        job.output["summary"],
        job.params["report"],
        runs_path=job.params.get("runs"),
    )
    log.info("wrote %s and %s", job.output["html"], job.output["summary"])
    log.info("headline numbers: %s", numbers)
    warning = (numbers.get("test") or {}).get("warning")
    if warning:  # the run's last job: the warning is its last line on the terminal too
        from imgpipe.core.logs import TERMINAL

        log.warning("%s; see %s#overview", warning, job.output["html"], extra={TERMINAL: True})
    return numbers
