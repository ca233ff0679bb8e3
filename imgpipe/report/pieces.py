"""The page's building blocks: the Jinja2 environment and the pieces every section uses.

Templates live in ``imgpipe/report/templates`` (package data). Autoescape is
on; every value a template prints goes through :func:`escape_value` first,
which escapes it with ``html.escape`` (quotes as ``&#x27;`` / ``&quot;``, the
spelling the page has always had: markupsafe would write ``&#39;`` / ``&#34;``
and change the page's bytes). Trusted fragments (other templates' output,
pandas' escaped tables) are ``Markup`` and pass unchanged.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from imgpipe.core.atomic import plain
from imgpipe.report.labels import label
from imgpipe.report.summary import _existing

# (id, heading) of each section, in reading order; the ids are stable anchors.
SECTIONS = (
    ("overview", "At a glance"),
    ("runs", "Runs side by side"),
    ("cleaning", "Dataset and cleaning"),
    ("augmentation", "Augmentation"),
    ("sweep", "Hyper-parameter sweep"),
    ("cv", "Cross-validation"),
    ("test", "Test set"),
    ("training", "Training curves"),
    ("suspects", "Suspect labels"),
    ("clusters", "Clusters"),
    ("config", "Configuration"),
)
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def escape_value(value: Any) -> Any:
    """What a template prints: Markup as it is, anything else escaped by ``html.escape``."""
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    finalize=escape_value,
    undefined=jinja2.StrictUndefined,
)


def render(template: str, **context: Any) -> Markup:
    """The template ``template`` rendered with ``context`` (trusted HTML)."""
    return Markup(ENV.get_template(template).render(**context))


def esc(value: Any) -> str:
    """Text from the data, escaped for HTML (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _pieces() -> Any:
    return ENV.get_template("pieces.html.j2").module


def note(text: str) -> Markup:
    """A short italic remark (e.g. why a section is empty)."""
    return _pieces().note(text)


def explain(text: Markup | str) -> Markup:
    """The sentence that says what the next table or figure shows."""
    return _pieces().explain(text)


def not_run(what: str) -> Markup:
    """The note a section shows when its input files are absent."""
    return _pieces().not_run(what)


def table(frame: pd.DataFrame, max_rows: int | None = None, index: bool = False) -> Markup:
    """An HTML table of ``frame`` (cells escaped by pandas), cut to ``max_rows`` with a note."""
    shown = frame if max_rows is None else frame.head(max_rows)
    body = Markup(
        shown.to_html(
            index=index, escape=True, border=0, na_rep="", float_format=lambda x: f"{x:.4g}"
        )
    )
    if max_rows is not None and len(frame) > max_rows:
        body += note(f"First {max_rows} of {len(frame)} rows.")
    return body


def human_table(frame: pd.DataFrame, max_rows: int | None = None) -> Markup:
    """``table`` with every column under its human name (``label``)."""
    return table(frame.rename(columns={c: label(c) for c in frame.columns}), max_rows)


def key_value_table(rows: Sequence[tuple[str, Any]], key_name: str, value_name: str) -> Markup:
    """A two-column table of (human name, value) rows, the names as row headers."""
    return row_table([(name, [value]) for name, value in rows], [key_name, value_name])


def row_table(rows: Sequence[tuple[str, Sequence[Any]]], headers: Sequence[str]) -> Markup:
    """A table whose first column names each row (row headers) and the others hold values."""
    return _pieces().row_table(headers, formatted(rows))


def formatted(rows: Sequence[tuple[str, Sequence[Any]]]) -> list[tuple[str, list[str]]]:
    """Rows of a ``row_table`` with each value as the page writes it (4 significant digits, n/a)."""
    return [(name, [_fmt(_cell(v)) for v in values]) for name, values in rows]


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple | Mapping):
        return json.dumps(value, ensure_ascii=False, default=str)
    return "n/a" if value is None else plain(value)


def figure(src: str, caption: str) -> Markup:
    """A <figure> of an image data URI with its caption."""
    return _pieces().figure(src, caption)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """Bytes as a base64 data URI (the page makes no request of its own)."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def image(inputs: Mapping[str, Any], key: str, caption: str) -> Markup:
    """A <figure> with the input image embedded as a data URI, or a note when it is absent."""
    path = _existing(inputs, key)
    if path is None:
        wanted = inputs.get(key)
        return not_run(f"the figure {Path(wanted).name}" if wanted else "this figure")
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return figure(data_uri(path.read_bytes(), mime), caption)


def section(section_id: str, body: Markup | str) -> Markup:
    """One <section> with its anchor id and heading."""
    return render(
        "section.html.j2", section_id=section_id, heading=dict(SECTIONS)[section_id], body=body
    )


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else _fmt(value)


def lines(*parts: Markup | str) -> Markup:
    """Parts of a section one per line (HTML pieces joined, nothing escaped again)."""
    return Markup("\n").join(parts)
