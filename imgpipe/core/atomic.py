"""Atomic file writes: a hidden temporary file beside the target, renamed into place.

A killed job therefore never leaves a file that looks complete: either the old
file (or none) is there, or the whole new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd
import yaml

# pandas 3 keeps text columns in pyarrow when pyarrow is installed (it is, for
# Parquet predictions), and pyarrow text must be valid UTF-8: a file name that
# is not (os.fsdecode's surrogates, kept byte for byte, see CSV_ENCODING) would
# fail in any table. Python-backed text holds it. Every imgpipe module that
# builds tables of file names imports this one.
pd.set_option("mode.string_storage", "python")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp*``) a killed earlier attempt left beside ``path``.

    Safe because one job at a time writes a given output (Snakemake's lock);
    every writer of this package names its temporary files this way.
    """
    target = Path(path)
    stale = [p for p in target.parent.glob(f".{target.name}.*.tmp*") if p.is_file()]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    # Hidden, unique, same folder (os.replace is atomic within a filesystem); the
    # suffix is kept for writers that infer the format from the name.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a new hidden folder beside ``path``, renamed to ``path`` only if the block succeeds.

    ``path`` must be missing or empty, unless ``replace`` (its old content is
    then removed just before the rename). On failure the temporary folder goes.
    """
    import shutil

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists() and any(target.iterdir()) and not replace:
        raise FileExistsError(f"{target} exists and is not empty; not writing over it")
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically: numpy values become plain ones, NaN / infinity null (strict JSON)."""
    text = json.dumps(plain(obj), indent=2, sort_keys=True, allow_nan=False)
    write_text(text + "\n", path)


# CSV files are UTF-8, except that a file name which is not valid UTF-8 (POSIX
# names are bytes) keeps its raw bytes: Python decodes such a name with
# surrogateescape (os.fsdecode), and writing / reading with the same error
# handler gives back the very bytes, so the path still opens the file.
CSV_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


def write_csv(table: pd.DataFrame, path: str | os.PathLike, index: bool = False) -> None:
    """Write a DataFrame as CSV atomically (its index too when ``index``); byte names round-trip."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=index, **CSV_ENCODING)


def read_csv(path: str | os.PathLike, **options: Any) -> pd.DataFrame:
    """``pandas.read_csv`` of a CSV this package wrote: file names that are not UTF-8 come back intact."""
    return pd.read_csv(path, encoding="utf-8", encoding_errors="surrogateescape", **options)


def write_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write YAML atomically (keys in insertion order, unicode kept)."""
    write_text(yaml.safe_dump(obj, sort_keys=False, allow_unicode=True), path)


def write_stream(write: Callable[[BinaryIO], Any], path: str | os.PathLike) -> None:
    """Write a file atomically through ``write(binary file)``, flushed to disk before the rename.

    For writers that take an open file, e.g. checkpoints:
    ``write_stream(lambda fh: torch.save(state, fh), path)``; the fsync makes a
    renamed checkpoint survive a power cut, not only a killed process.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())


def plain(value: Any) -> Any:
    """A plain-Python copy of a config or result value, safe for JSON / YAML / weights-only loading.

    Mappings become dicts (string keys), lists and tuples lists, numpy scalars
    and arrays Python values and lists, and NaN / infinity None.
    """
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
