"""The config_snapshot stage: the effective configuration of a run as results/config.yaml.

Its own module, not the report's: the snapshot's code fingerprint then covers
only what writes it, so editing the report (or what the report reads, such as
the sweep's ranking) does not rerun it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from imgpipe.core.atomic import plain, write_text
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def write_config_snapshot(
    config: Mapping,
    path: str | os.PathLike,
    configfiles: Sequence[str] = (),
    image: Mapping[str, Any] | None = None,
) -> None:
    """Write the effective (validated, defaults filled in) configuration as YAML.

    ``image`` (results/ingest/image.json) replaces the image section's values
    by those ingest used; a value the config left at ``auto`` gets a comment
    saying it was inferred from the data, and from what.
    """
    config = plain(config)
    notes: dict[str, str] = {}
    if image is not None:
        section = dict(config.get("image") or {})
        reasons = image.get("reasons", {})
        for key in ("size", "mode"):
            if section.get(key) == "auto":
                notes[key] = f"auto: inferred from the data ({reasons.get(key, 'image.json')})"
            section[key] = image[key]
        section["fit"] = image["fit"]
        config["image"] = section
    header = "# Effective configuration of this run (defaults filled in)"
    if configfiles:
        header += "\n# from: " + ", ".join(str(f) for f in configfiles)
    if notes:
        header += (
            f"\n# image.{' and image.'.join(notes)}: auto in the config, inferred from the "
            "data (results/ingest/image.json)"
        )
    body = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    write_text(header + "\n" + _annotate_image(body, notes), path)


def _annotate_image(text: str, notes: Mapping[str, str]) -> str:
    """Append ``# note`` to the image section's lines of a YAML dump."""
    lines, section = text.splitlines(), None
    for k, line in enumerate(lines):
        if line and not line.startswith(" "):
            section = line.split(":", 1)[0]
            continue
        key = line.strip().split(":", 1)[0]
        if section == "image" and key in notes:
            lines[k] = f"{line}  # {notes[key]}"
    return "\n".join(lines) + "\n"


def run_config_snapshot(job: StageJob) -> None:
    """The config_snapshot stage: the effective configuration as results/config.yaml."""
    image = None
    if job.input.get("image"):
        with open(job.input["image"], encoding="utf-8") as fh:
            image = json.load(fh)
    write_config_snapshot(
        job.params["config"], job.output["config"], job.params["configfiles"], image
    )
    log.info("wrote the effective configuration to %s", job.output["config"])
