"""Run a script's work with its output in the rule's log file, and progress lines on the terminal.

Snakemake runs a ``script:`` with nothing of its own on the terminal: ``logged``
sends stdout, stderr and logging to the rule's log file. Progress lines (the
training jobs' epoch lines, the data stages' counts, see :class:`Progress`)
go to the log like any other line and, while progress is on, also to the
terminal Snakemake was started from, prefixed with the job's name. Progress
is on unless the workflow switched it off (config ``progress: false`` or
``snakemake --quiet``: the Snakefile sets ``IMGPIPE_PROGRESS=0`` for its jobs).
Every line ends with a newline: no carriage-return bar in a log file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from imgpipe.core.errors import DataError

log = logging.getLogger("imgpipe")

# The environment variable the Snakefile sets for its jobs: "0" keeps the terminal quiet.
PROGRESS_VAR = "IMGPIPE_PROGRESS"
# The log record attribute that marks a line for the terminal too.
TERMINAL = "imgpipe_terminal"
# Shortest interval between two progress lines of a data stage.
PROGRESS_SECONDS = 5.0


def progress_wanted(switch: bool, quiet: Iterable[Any] | None) -> bool:
    """Whether jobs show progress lines on the terminal: the config switch is on and Snakemake is not quiet.

    ``quiet`` is Snakemake's ``--quiet`` setting (None, or a set of names /
    enums such as ``progress``, ``rules``, ``all``); a bare ``--quiet`` means
    ``{progress, rules}``.
    """
    names = {getattr(item, "name", str(item)).lower() for item in quiet or ()}
    return bool(switch) and not names & {"progress", "all"}


def progress_enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this job shows progress lines on the terminal (``IMGPIPE_PROGRESS`` is not ``0``)."""
    return env.get(PROGRESS_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def progress_line(message: str, *args: Any, logger: logging.Logger = log) -> None:
    """Log ``message % args`` to the job's log and, while progress is on, to the terminal."""
    logger.info(message, *args, extra={TERMINAL: True})


def duration(seconds: float) -> str:
    """Seconds as a short human duration: ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Progress of a long loop: a line with count, rate and time left, at most every ``every`` seconds.

    ``every`` defaults to ``PROGRESS_SECONDS`` (5 s).
    ``update(done)`` takes the count done so far (``advance(n)`` adds to it).
    Nothing is shown until ``every`` seconds have passed, then at most one
    line per ``every`` seconds, ``label: 1,200/5,000 images (24%), 410
    images/s, 9 s left``; reaching ``total`` shows the closing line
    ``label: 5,000/5,000 images in 12 s (410 images/s)`` once (``finish()``
    shows it for a loop that ends early). Lines go through
    :func:`progress_line`: the job's log, and the terminal while progress is on.
    """

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "images",
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.total, self.label, self.unit = int(total), label, unit
        self.every = float(PROGRESS_SECONDS if every is None else every)
        self.clock, self.logger = clock, logger
        self.started = self.last_line = clock()
        self.done = 0
        self.finished = False

    def update(self, done: int) -> None:
        """Record ``done`` items; show a line when ``every`` seconds have passed or all are done."""
        self.done = int(done)
        if self.finished:
            return
        if self.done >= self.total:
            self.finish()
            return
        now = self.clock()
        if now - self.last_line < self.every:
            return
        self.last_line = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else None
        progress_line(
            "%s: %s/%s %s (%d%%), %s %s/s, %s left",
            self.label,
            f"{self.done:,}",
            f"{self.total:,}",
            self.unit,
            100 * self.done // max(self.total, 1),
            _rate(rate),
            self.unit,
            duration(left) if left is not None else "unknown time",
            logger=self.logger,
        )

    def advance(self, n: int = 1) -> None:
        """Record ``n`` more items done."""
        self.update(self.done + n)

    def finish(self) -> None:
        """Show the closing line (count, time taken, rate) unless it was shown already."""
        if self.finished:
            return
        self.finished = True
        elapsed = max(self.clock() - self.started, 1e-9)
        progress_line(
            "%s: %s/%s %s in %s (%s %s/s)",
            self.label,
            f"{self.done:,}",
            f"{self.total:,}",
            self.unit,
            duration(elapsed),
            _rate(self.done / elapsed),
            self.unit,
            logger=self.logger,
        )


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def job_label(log_path: str | os.PathLike) -> str:
    """A job's name from its log's path: ``logs/cv/fold-0.log`` -> ``cv/fold-0`` (else the file's stem)."""
    parts = list(Path(log_path).with_suffix("").parts)
    if "logs" in parts:
        parts = parts[len(parts) - parts[::-1].index("logs") :]
    else:
        parts = parts[-1:]
    return "/".join(parts) or str(log_path)


class _TerminalOnly(logging.Filter):
    """Passes the records marked for the terminal (see :func:`progress_line`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """True for records marked for the terminal."""
        return bool(getattr(record, TERMINAL, False))


def _terminal_stream(real_stderr: Any) -> tuple[Any, bool]:
    """A line-buffered stream on the terminal's descriptor, and whether we own (must close) it.

    The descriptor is duplicated before any redirection: the C decoders'
    stderr (descriptor 2) is pointed at the log file later, the duplicate still
    reaches the terminal (or whatever Snakemake's stderr is: a pipe, SLURM's log).
    """
    try:
        fd = os.dup(real_stderr.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return real_stderr, False  # not a real file (e.g. captured by pytest): write to it as is
    return open(fd, "w", encoding="utf-8", errors="replace", buffering=1), True  # noqa: SIM115


class _TerminalFormatter(logging.Formatter):
    """``[job] message``; a warning also names its level there (the log file's format
    carries the level already, so a message never repeats it)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        """The record's line for the terminal."""
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname}: {message}"
        return self.prefix + message


def _terminal_handler(real_stderr: Any, job_name: str) -> tuple[logging.Handler, Any, bool]:
    stream, owned = _terminal_stream(real_stderr)
    handler = logging.StreamHandler(stream)
    prefix = f"[{job_name}] " if job_name else ""
    handler.setFormatter(_TerminalFormatter(prefix))
    handler.addFilter(_TerminalOnly())
    return handler, stream, owned


@contextlib.contextmanager
def logged(log_path: str | os.PathLike | None, job_name: str = "") -> Iterator[logging.Logger]:
    """Send stdout, stderr and logging to ``log_path``; turn a DataError into one clear line.

    The DataError's message also goes to the terminal (the real stderr), so a
    user sees why the run stopped without opening the log. While progress is
    on (:func:`progress_enabled`), progress lines also go to the terminal,
    prefixed with ``[job_name]`` (default: the log's path below ``logs/``
    without ``.log``, e.g. ``sweep/lr~0.01``: it names the job and its log).
    """
    real_stderr = sys.stderr
    job_name = job_name or (job_label(log_path) if log_path is not None else "")
    if log_path is None:
        stream = sys.stderr
        closer: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        # backslashreplace: a logged file name that is not UTF-8 shows as \\xNN, never fails.
        stream = open(log_path, "w", encoding="utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115
        closer = stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    # Without a log file the lines already reach stderr: no second copy.
    terminal = (
        _terminal_handler(real_stderr, job_name)
        if log_path is not None and progress_enabled()
        else None
    )
    if terminal is not None:
        root.addHandler(terminal[0])
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
        if terminal is not None:
            root.removeHandler(terminal[0])
            if terminal[2]:
                terminal[1].close()
