"""Run a script's work with its output in the rule's log file."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from imgpipe.errors import DataError

log = logging.getLogger("imgpipe")


@contextlib.contextmanager
def logged(log_path: str | os.PathLike | None) -> Iterator[logging.Logger]:
    """Send stdout, stderr and logging to ``log_path``; turn a DataError into one clear line.

    The DataError's message also goes to the terminal (the real stderr), so a
    user sees why the run stopped without opening the log.
    """
    real_stderr = sys.stderr
    if log_path is None:
        stream = sys.stderr
        closer: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
        closer = stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with (
            closer,
            contextlib.redirect_stdout(stream),
            contextlib.redirect_stderr(stream),
        ):
            try:
                yield log
            except DataError as err:
                log.error("%s", err)
                print(f"imgpipe: {err}", file=real_stderr, flush=True)
                raise SystemExit(1) from None
    finally:
        root.removeHandler(handler)
