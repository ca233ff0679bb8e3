"""Progress lines: the rate-limited helper of the data stages, and the terminal copy of progress lines."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imgpipe.core import logs
from imgpipe.core.logs import Progress, duration, job_label, progress_enabled, progress_wanted

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "imgpipe"]


def test_progress_lines_are_rate_limited_with_count_rate_and_time_left(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="imgpipe")
    progress = Progress(1000, "shard 3", unit="files", every=5.0, clock=clock)
    for done in range(1, 1001):
        clock.now = 100.0 + done / 50  # 50 files/s: 20 s in all
        progress.update(done)
    lines = messages(caplog)
    # One line per 5 s of the 20 s (at 5, 10, 15 s), then the closing line at 1000.
    assert len(lines) == 4
    assert lines[0] == "shard 3: 250/1,000 files (25%), 50 files/s, 15 s left"
    assert lines[1] == "shard 3: 500/1,000 files (50%), 50 files/s, 10 s left"
    assert lines[-1] == "shard 3: 1,000/1,000 files in 20 s (50 files/s)"
    # Updates after the end add nothing.
    progress.update(1000)
    progress.finish()
    assert len(messages(caplog)) == 4


def test_progress_advance_and_an_early_end(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="imgpipe")
    progress = Progress(10, "k scan", unit="k values", every=1.0, clock=clock)
    progress.advance(3)
    assert messages(caplog) == []  # under a second: nothing yet
    clock.now += 1.5
    progress.advance()
    assert messages(caplog) == ["k scan: 4/10 k values (40%), 2.7 k values/s, 2 s left"]
    progress.finish()  # the loop ended early
    assert messages(caplog)[-1] == "k scan: 4/10 k values in 2 s (2.7 k values/s)"


def test_progress_of_nothing_closes_at_once(caplog):
    caplog.set_level(logging.INFO, logger="imgpipe")
    Progress(0, "augment").update(0)
    assert messages(caplog) == ["augment: 0/0 images in 0 s (0 images/s)"]


def test_durations_read_as_people_write_them():
    assert duration(0.4) == "0 s"
    assert duration(42) == "42 s"
    assert duration(185) == "3 min 05 s"
    assert duration(7620) == "2 h 07 min"


@pytest.mark.parametrize(
    ("switch", "quiet", "wanted"),
    [
        (True, None, True),
        (False, None, False),
        (True, set(), True),
        (True, {"rules"}, True),
        (True, {"progress", "rules"}, False),  # a bare --quiet
        (True, {"all"}, False),
        (True, {"PROGRESS"}, False),
    ],
)
def test_progress_is_wanted_unless_switched_off_or_quiet(switch, quiet, wanted):
    assert progress_wanted(switch, quiet) is wanted


def test_progress_wanted_reads_snakemake_quietness_enums():
    from snakemake.settings.enums import Quietness

    assert not progress_wanted(True, {Quietness.PROGRESS, Quietness.RULES})
    assert progress_wanted(True, {Quietness.REASON})


def test_progress_enabled_follows_the_environment():
    assert progress_enabled({})
    assert progress_enabled({logs.PROGRESS_VAR: "1"})
    assert not progress_enabled({logs.PROGRESS_VAR: "0"})


def test_job_label_is_the_log_path_below_logs():
    assert job_label("logs/cv/fold-0.log") == "cv/fold-0"
    assert job_label("/work/run/logs/sweep/lr~0.01.log") == "sweep/lr~0.01"
    assert job_label("logs/clean.log") == "clean"
    assert job_label("/tmp/elsewhere/job.log") == "job"


JOB_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from imgpipe.core.logs import Progress, logged, progress_line
    from imgpipe.workflow.stage_job import c_stderr_to_log
    with logged(sys.argv[1]), c_stderr_to_log():  # as run_stage does
        print("plain output")
        logging.getLogger("imgpipe").info("a log line")
        progress_line("epoch %d/%d: train_loss %.1f", 1, 2, 0.5)
        Progress(3, "shard 0", unit="files").update(3)
        os.write(2, b"C library warning\\n")  # the raw descriptor, as libpng writes
    """
)


def run_job(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT)
    log_path = tmp_path / "logs" / "ingest" / "shard-0.log"
    return subprocess.run(
        [sys.executable, str(script), str(log_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=tmp_path,
        check=True,
    )


def test_progress_lines_reach_the_terminal_prefixed_with_the_job(tmp_path):
    done = run_job(tmp_path, {logs.PROGRESS_VAR: "1"})
    terminal = done.stderr.splitlines()
    assert terminal == [
        "[ingest/shard-0] epoch 1/2: train_loss 0.5",
        "[ingest/shard-0] shard 0: 3/3 files in 0 s (" + terminal[1].split("(", 1)[1],
    ]
    assert done.stdout == ""
    log_text = (tmp_path / "logs" / "ingest" / "shard-0.log").read_text()
    expected = (
        "plain output",
        "a log line",
        "epoch 1/2",
        "shard 0: 3/3 files",
        "C library warning",
    )
    for line in expected:
        assert line in log_text
    assert "\r" not in log_text


def test_progress_stays_off_the_terminal_when_switched_off(tmp_path):
    done = run_job(tmp_path, {logs.PROGRESS_VAR: "0"})
    assert done.stderr == ""
    log_text = (tmp_path / "logs" / "ingest" / "shard-0.log").read_text()
    assert "epoch 1/2" in log_text and "shard 0: 3/3 files" in log_text
