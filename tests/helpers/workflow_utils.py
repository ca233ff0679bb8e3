"""Helpers for workflow tests: a private copy of the workflow, a tiny image tree, real snakemake runs."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import yaml

from imgpipe.stages.demo import digits_images

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
WORKFLOW_PARTS = ["Snakefile", "workflow", "config", "imgpipe", "scripts", "profiles", "envs"]

# The workflow's catalog-style test config (.test/config/config.yaml), without its
# data.root (each test writes its own tree): small and quick, but every stage
# runs (2 sweep trials, 2 folds, both cluster feature spaces).
TEST_CONFIG_FILE = REPO / ".test" / "config" / "config.yaml"
TINY_CONFIG = {k: v for k, v in yaml.safe_load(TEST_CONFIG_FILE.read_text()).items() if k != "data"}


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, nested dicts key by key (copies, no mutation)."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# The shared finished run (conftest's finished_run): the tiny config on digits_tree's
# data, with a third epoch so that a training job can be killed between two checkpoints.
FINISHED_RUN_CONFIG = deep_merge(
    TINY_CONFIG, {"data": {"root": "data"}, "train": {"max_epochs": 3}}
)


def copy_workflow(dest: Path) -> Path:
    """Copy the parts of the repository a run needs into ``dest`` (edits there stay there)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in WORKFLOW_PARTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def write_config(workdir: Path, changes: dict) -> dict:
    """Merge ``changes`` into the copy's config/config.yaml; return the new config."""
    path = workdir / "config" / "config.yaml"
    config = deep_merge(yaml.safe_load(path.read_text()), changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return config


def digits_tree(root: Path, per_class: int = 20, classes: int = 4, size: int = 16) -> Path:
    """Write ``per_class`` digits of each of the first ``classes`` classes as PNGs under ``root``."""
    images, labels = digits_images()
    for label in range(classes):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for n, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            # Nearest neighbour keeps the strokes sharp (a linear upscale is blurry).
            image = cv2.resize(images[index], (size, size), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(folder / f"{n:03d}.png"), image)
    return root


def snakemake(
    workdir: Path, *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run snakemake in ``workdir`` (its own copy of the workflow); fail with its output."""
    proc = subprocess.run(
        ["timeout", "-k", "10", str(timeout), SNAKEMAKE, "--cores", "2", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def planned_jobs(workdir: Path, *args: str) -> Counter:
    """Rules (with job counts) a dry run would execute now."""
    proc = snakemake(workdir, *args, "-n", "--quiet", "rules")
    text = proc.stdout + proc.stderr
    jobs: Counter = Counter()
    for name, count in re.findall(r"^(\w+)\s+(\d+)\s*$", text, re.MULTILINE):
        if name != "total":
            jobs[name] = int(count)
    return jobs


def tree_digest(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` with its mode and bytes, to prove a tree unchanged."""
    digest = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            digest[str(path.relative_to(root))] = (0, str(path.readlink()).encode())
        elif path.is_file():
            digest[str(path.relative_to(root))] = (path.stat().st_mode, path.read_bytes())
    return digest


# ---------------------------------------------------------------- faults: kills and bad input


def start_snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    """Start snakemake in its own process group (so one killpg reaches every job it started)."""
    return subprocess.Popen(
        [SNAKEMAKE, "--cores", "2", *args],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def fresh_files(workdir: Path, pattern: str, since_ns: int) -> list[Path]:
    """Files matching ``pattern`` under ``workdir`` written at or after ``since_ns``."""
    found = []
    for path in workdir.glob(pattern):
        try:
            if path.stat().st_mtime_ns >= since_ns:
                found.append(path)
        except FileNotFoundError:  # renamed or removed while we looked
            continue
    return found


def tmp_leftovers(root: Path) -> list[Path]:
    """Temporary files (``*.tmp*``) anywhere under ``root``: none may survive a finished run."""
    return sorted(p for p in root.rglob("*") if ".tmp" in p.name)
