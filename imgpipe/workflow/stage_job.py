"""What a rule hands its stage function, and the one way every script runs it.

Each ``scripts/<rule>.py`` is three statements: put the workflow's folder on
``sys.path``, import ``run_<rule>`` from its module, and call
``run_stage(snakemake, run_<rule>)``. The stage function receives a
:class:`StageJob` of plain values, so it runs (and is tested) without Snakemake.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from imgpipe.core.logs import logged


@dataclass
class StageJob:
    """One job of a rule: its named inputs and outputs (paths or lists of paths), params and job facts."""

    input: Mapping[str, Any] = field(default_factory=dict)
    output: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    wildcards: Mapping[str, str] = field(default_factory=dict)
    threads: int = 1
    resources: Mapping[str, Any] = field(default_factory=dict)
    log: str | None = None
    rule: str = ""
    # The rule's code fingerprint (its ``code`` param) and the whole config, for
    # what decides no result (loader workers, image fit of old arrays, ...).
    code: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)


def _plain_files(named: Any) -> dict[str, Any]:
    """Snakemake's named input / output lists as {name: path or [paths]} of plain strings."""
    out: dict[str, Any] = {}
    for name, value in named.items():
        if isinstance(value, str):
            out[name] = str(value)
        else:
            out[name] = [str(item) for item in value]
    return out


def job_from_snakemake(smk: Any) -> StageJob:
    """A StageJob from the ``snakemake`` object of a ``script:`` rule."""
    params = {name: value for name, value in smk.params.items()}
    code = str(params.pop("code", ""))  # the fingerprint decides reruns and resumes, not results
    resources = {name: value for name, value in smk.resources.items()}
    return StageJob(
        input=_plain_files(smk.input),
        output=_plain_files(smk.output),
        params=params,
        wildcards={name: str(value) for name, value in smk.wildcards.items()},
        threads=int(smk.threads),
        resources=resources,
        log=str(smk.log[0]) if len(smk.log) else None,
        rule=str(smk.rule),
        code=code,
        config=smk.config,
    )


@contextlib.contextmanager
def c_stderr_to_log() -> Iterator[None]:
    """Point file descriptor 2 (where libpng / libjpeg / libtiff print) at the open log file.

    ``logged`` redirects Python's streams only; the codecs write to the raw
    descriptor, and each bad file would otherwise print to the terminal.
    Sharing the log's open file (dup of its descriptor) keeps one file offset,
    so the two writers append to each other instead of overwriting.
    """
    sys.stdout.flush()
    try:
        target = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file: nothing to redirect
        yield
        return
    saved = os.dup(2)
    try:
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run_stage(smk: Any, stage: Callable[[StageJob], Any]) -> Any:
    """Run ``stage`` on the rule's job with all its output (and C libraries' stderr) in the rule's log."""
    job = job_from_snakemake(smk)
    with logged(job.log), c_stderr_to_log():
        return stage(job)
