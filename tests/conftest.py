"""What every test shares: the one tiny configuration (.test/config/config.yaml) and the digits.

The tiny configuration is the catalog-style test config of the workflow, merged
over config/config.yaml; unit tests take its model / train sections from the
``tiny_model`` / ``tiny_train`` fixtures, workflow tests its overrides from
``workflow_utils.TINY_CONFIG``.
"""

from __future__ import annotations

import copy
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from helpers.workflow_utils import (
    FINISHED_RUN_CONFIG,
    REPO,
    TINY_CONFIG,
    copy_workflow,
    deep_merge,
    digits_tree,
    planned_jobs,
    snakemake,
    write_config,
)
from hypothesis import settings

from imgpipe.stages.demo import digits_images

# The same examples on every run (CI included): a property test fails for a reason
# that reproduces, never for an example one run happened to draw.
settings.register_profile("imgpipe", derandomize=True, database=None)
settings.load_profile("imgpipe")

DEFAULT_CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
TINY = deep_merge(DEFAULT_CONFIG, TINY_CONFIG)


@pytest.fixture
def tiny_config() -> dict:
    """The whole tiny configuration (a fresh copy per test)."""
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_model() -> dict:
    """The tiny model section: a two-block small CNN without dropout."""
    return copy.deepcopy(TINY["model"])


@pytest.fixture
def tiny_train() -> dict:
    """The tiny train section: two epochs, batch 32, one thread, no early stopping."""
    return copy.deepcopy(TINY["train"])


def digits_at(size: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` digits resized to ``size`` px as uint8 (N, size, size, 1), and their labels."""
    images, labels = digits_images()
    images, labels = images[:n], labels[:n]
    resized = np.stack(
        [cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in images]
    )
    return resized[:, :, :, None], labels


@pytest.fixture(scope="session")
def digits16() -> tuple[np.ndarray, np.ndarray]:
    """500 digits at 16 px (grey, NHWC) and their labels: the training tests' data."""
    return digits_at(16, 500)


def fit_on(data, train_ids, val_ids, model_cfg, train_cfg, out_dir, views=(None, None), **kw):
    """``imgpipe.learn.fit.fit`` on ``data`` = (images, labels) and ``views`` = (images, sources)."""
    from imgpipe.learn.fit import fit

    images, labels = data
    return fit(images, labels, train_ids, val_ids, *views, model_cfg, train_cfg, out_dir, **kw)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """One completed run of every stage (FINISHED_RUN_CONFIG), made once for the whole session.

    For tests that read a finished run or work on a copy of it (finished_copy): rerun
    scope, the report, the terminal's progress lines (``terminal.txt`` beside it), the
    crash test's reference. Never change it: copy it.
    """
    workdir = copy_workflow(tmp_path_factory.mktemp("finished") / "wf")
    digits_tree(workdir / "data")
    write_config(workdir, FINISHED_RUN_CONFIG)
    run = snakemake(workdir)
    (workdir.parent / "terminal.txt").write_text(run.stdout + "\n" + run.stderr)
    return workdir


@pytest.fixture
def finished_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run (mtimes kept): nothing is planned in it."""
    workdir = tmp_path / "wf"
    shutil.copytree(finished_run, workdir, symlinks=True)
    assert planned_jobs(workdir) == Counter()
    return workdir
