"""The split stage (rule split): train / val / test roles for every kept image, groups kept whole."""

from __future__ import annotations

import logging

from imgpipe.core.atomic import write_csv
from imgpipe.data.split import assign_roles, check_test_source
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_split(job: StageJob) -> None:
    """The split stage: assign roles to the clean index and write split.csv."""
    from imgpipe.data.dataset import load_index

    index = load_index(job.input["index"])
    check_test_source(index, job.params["test_root"])
    cfg = job.params["split"]
    roles = assign_roles(index, cfg["test_fraction"], cfg["val_fraction"], cfg["seed"])
    write_csv(roles, job.output["split"])
    log.info("wrote %d roles to %s", len(roles), job.output["split"])
