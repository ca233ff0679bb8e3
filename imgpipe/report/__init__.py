"""The results page, its headline numbers (summary.json) and the run ledger (runs.csv).

Modules: ``summary`` (headline numbers from the result files), ``ledger``
(results/runs.csv), ``labels`` (human names), ``pieces`` (Jinja2 environment
and shared page pieces), ``sections`` and ``model_sections`` (one function per
page section), ``page`` (the page and summary.json; the stage that calls it is
imgpipe.stages.report);
templates in ``templates/``; charts in imgpipe.core.plots.
"""

from imgpipe.report.page import render_page, write_report
from imgpipe.report.summary import headline

__all__ = ["headline", "render_page", "write_report"]
