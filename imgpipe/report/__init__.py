"""The report stage: the results page, its headline numbers (summary.json) and the run ledger (runs.csv).

Modules: ``summary`` (headline numbers from the result files), ``ledger``
(results/runs.csv), ``labels`` (human names), ``pieces`` (Jinja2 environment
and shared page pieces), ``sections`` and ``model_sections`` (one function per
page section), ``page`` (the page, summary.json, the stage's entry point);
templates in ``templates/``; charts in imgpipe.core.plots.
"""

from imgpipe.report.page import render_page, run_report, write_report
from imgpipe.report.summary import headline

__all__ = ["headline", "render_page", "run_report", "write_report"]
