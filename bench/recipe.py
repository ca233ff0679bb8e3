"""Benchmark: how well the default recipe trains, over seeds and data sizes, beside logistic regression.

Every run is the real workflow (``snakemake`` in a temporary copy of the
repository's workflow files) with the default config and only ``data.root``
set (plus the seed being varied), targeting only what the table needs:
``results/evaluate/metrics.json`` (sweep, final model, test metrics) and, for
the demo rows, ``results/cv/summary.csv``. Clustering and the report are
skipped. Two groups of rows:

- the demo (the 1,797 digits as a PNG tree, ``data.root: demo``) with
  ``train.seed`` 0..seeds-1 and ``split.seed`` 0..split-seeds-1: test accuracy
  mean and min, and the CV mean accuracy (goals: mean >= 0.985, min >= 0.98,
  CV mean within +-0.01 of the test mean);
- class-balanced subsets of the digits (``--sizes`` images, ``--draws`` draws
  each, written as PNG trees like the demo) beside logistic regression
  (scikit-learn, standardised raw pixels) fitted on the same run's training
  pool (roles train + val of ``results/split/split.csv``) and scored on its
  test role (goal: the default recipe at or above it on average).

The last line is ``default recipe vs logistic regression (digits subsets): ratio X``
(the mean test accuracy of the recipe over that of logistic regression).
No assertions on time or accuracy.

    .venv/bin/python bench/recipe.py [--seeds 5] [--split-seeds 3] [--sizes 100,200,300]
        [--draws 5] [--no-cv] [--cores 2] [--workflow DIR]

``--workflow DIR`` runs another checkout's workflow (e.g. a worktree of main)
with this script, for a before / after comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imgpipe.demo import digits_images  # noqa: E402

WORKFLOW_PARTS = ["Snakefile", "workflow", "config", "imgpipe", "scripts", "profiles", "envs"]
METRICS = "results/evaluate/metrics.json"
CV_SUMMARY = "results/cv/summary.csv"


def copy_workflow(source: Path, dest: Path) -> Path:
    """Copy the parts of ``source`` a run needs into ``dest`` (as tests/workflow_utils does)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in WORKFLOW_PARTS:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def balanced_subset(n: int, draw: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced draw of ``n`` digits (n / 10 per class), seeded by ``draw``."""
    images, labels = digits_images()
    rng = np.random.default_rng([n, draw])
    classes = np.unique(labels)
    per_class = n // len(classes)
    chosen = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    )
    return images[chosen], labels[chosen]


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The images as ``root/<label>/<n>.png`` (8 px grey, like the demo's tree)."""
    for n, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{n:04d}.png"), image)
    return root


def run_workflow(workdir: Path, config: dict, targets: list[str], cores: int) -> float:
    """Run snakemake on ``targets`` with ``config`` merged over the default; return the wall seconds."""
    # progress off: the jobs' lines stay in their logs.
    (workdir / "bench.yaml").write_text(yaml.safe_dump({**config, "progress": False}))
    started = time.perf_counter()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            *targets,
            "--cores",
            str(cores),
            "--configfile",  # takes every word after it: the targets come first
            "bench.yaml",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"snakemake failed in {workdir}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return time.perf_counter() - started


def test_accuracy(workdir: Path) -> float:
    """The final model's test accuracy."""
    return float(json.loads((workdir / METRICS).read_text())["accuracy"])


def cv_accuracy(workdir: Path) -> float:
    """The mean CV accuracy over the folds."""
    table = pd.read_csv(workdir / CV_SUMMARY, dtype={"fold": str})
    return float(table.loc[table["fold"] == "mean", "accuracy"].iloc[0])


def logistic_regression_accuracy(workdir: Path) -> float:
    """Logistic regression on the standardised raw pixels: fitted on train + val, scored on test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    index = pd.read_csv(workdir / "results/clean/index.csv", dtype={"label": str})
    roles = pd.read_csv(workdir / "results/split/split.csv")
    table = index.merge(roles, on="id")
    pixels = np.stack(
        [
            cv2.imread(str(workdir / path), cv2.IMREAD_GRAYSCALE).reshape(-1)
            for path in table["path"]
        ]
    ).astype(np.float64)
    train = table["role"].isin(["train", "val"]).to_numpy()
    test = (table["role"] == "test").to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(pixels[train], table["label"][train])
    return float((model.predict(pixels[test]) == table["label"][test]).mean())


def demo_rows(args: argparse.Namespace, scratch: Path) -> pd.DataFrame:
    """One row per (train.seed, split.seed) demo run: test and CV accuracy."""
    rows = []
    targets = [METRICS, *([] if args.no_cv else [CV_SUMMARY])]
    for split_seed in range(args.split_seeds):
        for seed in range(args.seeds):
            workdir = copy_workflow(args.workflow, scratch / f"demo-{seed}-{split_seed}")
            config = {
                "data": {"root": "demo"},
                "train": {"seed": seed},
                "split": {"seed": split_seed},
            }
            seconds = run_workflow(workdir, config, targets, args.cores)
            row = {"train.seed": seed, "split.seed": split_seed, "test_acc": test_accuracy(workdir)}
            row["cv_acc"] = np.nan if args.no_cv else cv_accuracy(workdir)
            row["seconds"] = round(seconds, 1)
            print("demo", row, flush=True)
            rows.append(row)
            shutil.rmtree(workdir, ignore_errors=True)
    return pd.DataFrame(rows)


def subset_rows(args: argparse.Namespace, scratch: Path) -> pd.DataFrame:
    """One row per subset draw: the recipe's and logistic regression's test accuracy."""
    rows = []
    for size in args.sizes:
        for draw in range(args.draws):
            workdir = copy_workflow(args.workflow, scratch / f"subset-{size}-{draw}")
            write_tree(workdir / "data", *balanced_subset(size, draw))
            seconds = run_workflow(workdir, {"data": {"root": "data"}}, [METRICS], args.cores)
            row = {
                "images": size,
                "draw": draw,
                "recipe_acc": test_accuracy(workdir),
                "logreg_acc": logistic_regression_accuracy(workdir),
                "seconds": round(seconds, 1),
            }
            print("subset", row, flush=True)
            rows.append(row)
            shutil.rmtree(workdir, ignore_errors=True)
    return pd.DataFrame(rows)


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="demo train.seed 0..N-1")
    parser.add_argument("--split-seeds", type=int, default=3, help="demo split.seed 0..N-1")
    parser.add_argument("--sizes", default="100,200,300", help="subset sizes (images)")
    parser.add_argument("--draws", type=int, default=5, help="draws per subset size")
    parser.add_argument("--no-cv", action="store_true", help="skip the demo's cross-validation")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workflow", type=Path, default=REPO, help="checkout whose workflow runs")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.workflow = args.workflow.resolve()
    return args


def main() -> None:
    """Run the grid and print both tables and the closing ratio."""
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="imgpipe-recipe-") as tmp:
        demo = demo_rows(args, Path(tmp)) if args.seeds and args.split_seeds else pd.DataFrame()
        subsets = subset_rows(args, Path(tmp)) if args.sizes and args.draws else pd.DataFrame()
    print(f"\nworkflow: {args.workflow}")
    if len(demo):
        print("\ndemo (1,797 digits), default recipe:")
        print(demo.to_string(index=False))
        mean, low, cv = demo["test_acc"].mean(), demo["test_acc"].min(), demo["cv_acc"].mean()
        print(
            f"test accuracy mean {mean:.4f} (goal >= 0.985), min {low:.4f} (goal >= 0.98), "
            f"CV mean {cv:.4f} (goal within +-0.01 of the test mean: {cv - mean:+.4f})"
        )
    if len(subsets):
        print("\nclass-balanced digits subsets, default recipe vs logistic regression:")
        by_size = subsets.groupby("images")[["recipe_acc", "logreg_acc", "seconds"]].mean()
        print(by_size.round(4).to_string())
        ratio = subsets["recipe_acc"].mean() / subsets["logreg_acc"].mean()
        print(f"default recipe vs logistic regression (digits subsets): ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
