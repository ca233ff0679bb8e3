"""The file ``imgpipe predict`` writes: CSV, JSON or Parquet, rows appended batch by batch.

Every format holds the same rows and columns: text cells as text, scores as
numbers rounded to 6 significant digits (CSV writes them as text, JSON and
Parquet as numbers), an empty cell as "" in CSV and as null in JSON and
Parquet. Rows are written as they come, so memory follows the batch, not the
input; the file appears under its name only once complete
(``imgpipe.core.atomic.atomic_path``).

* CSV: UTF-8; a path that is not valid UTF-8 is written byte for byte
  (``imgpipe.core.atomic.CSV_ENCODING``).
* JSON: one array of objects (``pandas.read_json(path)`` reads it back); a
  path that is not valid UTF-8 keeps its bytes as ``\\udcXX`` escapes.
* Parquet (pandas + pyarrow, one row group per batch): strings must be UTF-8,
  so a path that is not shows its odd bytes as ``\\xNN``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from imgpipe.core.errors import DataError

FORMATS = ("csv", "json", "parquet")
# What the output's suffix says when no format is given (anything else: csv).
FORMAT_OF_SUFFIX = {".csv": "csv", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
# Columns holding scores (numbers); every other column holds text.
SCORE_PREFIXES = ("probability", "logit")


def output_format(path: str | os.PathLike, given: str | None = None) -> str:
    """``given`` (csv, json or parquet), else what the output's suffix says (csv by default)."""
    if given is None:
        return FORMAT_OF_SUFFIX.get(Path(path).suffix.lower(), "csv")
    if given not in FORMATS:
        raise DataError(f"output format {given!r}: expected one of {', '.join(FORMATS)}")
    return given


def score(value: float) -> float:
    """A score as every format stores it: 6 significant digits."""
    return float(f"{value:.6g}")


def is_score_column(name: str) -> bool:
    """Whether a prediction column holds scores (probability, logit and their _k ranks)."""
    return name.split("_")[0] in SCORE_PREFIXES


class RowWriter(Protocol):
    """Appends rows (lists in column order; None for an empty cell) to an open output."""

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        """Append ``rows``."""


class _CsvRows:
    def __init__(self, fh: Any, columns: Sequence[str]) -> None:
        self.writer = csv.writer(fh)
        self.writer.writerow(columns)

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        self.writer.writerows(
            ["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in row]
            for row in rows
        )


class _JsonRows:
    def __init__(self, fh: Any, columns: Sequence[str]) -> None:
        self.fh, self.columns, self.first = fh, list(columns), True
        fh.write("[")

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            text = json.dumps(dict(zip(self.columns, row, strict=True)), allow_nan=False)
            self.fh.write(("\n" if self.first else ",\n") + text)
            self.first = False

    def close(self) -> None:
        self.fh.write("\n]\n")


class _ParquetRows:
    def __init__(self, path: str, columns: Sequence[str]) -> None:
        pa, pq = _pyarrow()
        self.pa, self.columns = pa, list(columns)
        self.schema = pa.schema(
            [(c, pa.float64() if is_score_column(c) else pa.string()) for c in columns]
        )
        self.writer = pq.ParquetWriter(path, self.schema)

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        cells = list(zip(*rows, strict=True))
        arrays = [
            self.pa.array(
                values if is_score_column(name) else [_utf8(v) for v in values],
                type=field.type,
            )
            for name, values, field in zip(self.columns, cells, self.schema, strict=True)
        ]
        self.writer.write_table(self.pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def _utf8(value: str | None) -> str | None:
    """Text Parquet can hold: the bytes of a non-UTF-8 file name as \\xNN."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "Parquet output needs pyarrow, which is not installed: pip install pyarrow "
            "(or write csv or json)"
        ) from None
    return pa, pq


def check_writable(fmt: str) -> None:
    """Refuse a format this Python cannot write (Parquet without pyarrow) before any work."""
    if fmt == "parquet":
        _pyarrow()


@contextlib.contextmanager
def open_rows(path: str | os.PathLike, fmt: str, columns: Sequence[str]) -> Iterator[RowWriter]:
    """A RowWriter onto ``path`` in format ``fmt``; the file appears once the block ends cleanly."""
    from imgpipe.core.atomic import CSV_ENCODING, atomic_path

    with atomic_path(path) as tmp:
        if fmt == "parquet":
            writer = _ParquetRows(str(tmp), columns)
            try:
                yield writer
            finally:
                writer.close()
            return
        # JSON escapes every non-ASCII character: the surrogates of a non-UTF-8 name included.
        with open(tmp, "w", newline="", **CSV_ENCODING) as fh:
            rows: Any = _CsvRows(fh, columns) if fmt == "csv" else _JsonRows(fh, columns)
            yield rows
            if fmt == "json":
                rows.close()
            fh.flush()
            os.fsync(fh.fileno())
