"""The results page: one self-contained HTML file, a JSON of the headline numbers, and the run log.

Every input is optional at render time: a missing file (sweep disabled, a
cluster feature space not configured, a stage that has not run) becomes a short
"not run" note in its section, never an error. The page is rendered from the
Jinja2 templates in ``templates/`` with autoescape on (pandas escapes its own
tables); images (the stages' figures and the charts of imgpipe.core.plots) are
embedded as base64 data URIs, so the page makes no request of its own.

The page is written for people: result keys and config keys appear under
human names with units (imgpipe.report.labels), every table and figure comes
with a sentence saying what it shows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import pandas as pd

from imgpipe.core.atomic import write_text
from imgpipe.data.listing import printable
from imgpipe.report.ledger import record_run
from imgpipe.report.model_sections import (
    clusters_section,
    cv_section,
    suspects_section,
    sweep_section,
    test_section,
    training_section,
)
from imgpipe.report.pieces import SECTIONS, render
from imgpipe.report.sections import (
    augmentation_section,
    cleaning_section,
    config_section,
    overview_section,
    runs_section,
)
from imgpipe.report.summary import headline

log = logging.getLogger("imgpipe")


def render_page(
    inputs: Mapping[str, Any],
    title: str = "imgpipe report",
    examples_per_reason: int = 8,
    max_rows: int = 25,
    runs: pd.DataFrame | None = None,
    current_run: str | None = None,
) -> str:
    """The whole self-contained HTML page for the named input files (and the run log, if given)."""
    numbers = headline(inputs, title)
    sections = [
        overview_section(numbers, inputs),
        runs_section(runs, current_run, max_rows),
        cleaning_section(inputs, examples_per_reason, max_rows),
        augmentation_section(inputs),
        sweep_section(inputs, max_rows),
        cv_section(inputs),
        test_section(inputs),
        training_section(inputs),
        suspects_section(inputs, max_rows),
        clusters_section(inputs),
        config_section(inputs),
    ]
    return str(render("page.html.j2", title=title, toc=SECTIONS, sections=sections))


def write_report(
    inputs: Mapping[str, Any],
    html_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    options: Mapping[str, Any],
    runs_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write index.html and summary.json (and log the run in ``runs_path``); return the numbers.

    ``options`` is the report section of the config (defaults filled in by the schema).
    """
    numbers = headline(inputs, options["title"])
    runs, current = record_run(inputs, numbers, runs_path) if runs_path else (None, None)
    page = render_page(
        inputs,
        title=options["title"],
        examples_per_reason=int(options["examples_per_reason"]),
        max_rows=int(options["max_rows"]),
        runs=runs,
        current_run=current,
    )
    # A file name that is not UTF-8 (kept byte for byte in the CSVs) is shown as \xNN.
    write_text(printable(page), html_path)
    write_text(printable(json.dumps(numbers, indent=2, ensure_ascii=False)) + "\n", summary_path)
    return numbers
