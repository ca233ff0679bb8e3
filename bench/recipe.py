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

Real image sets (``--sets icons,photos``), built offline into the scratch
folder from files Debian and PyPI packages install, each run with only
``data.root`` set and with ``model.name: resnet18`` (from scratch), beside
logistic regression on the raw pixels (32 px colour) of the same split: test
accuracy, balanced accuracy (a run whose test predictions are all one class is
flagged), the final model's training time per image, and the sweep trials'
validation loss (worst epoch and last epoch, eval mode): a spike there is the
batch-norm running statistics lagging the weights, not the training loss.
``--real-models`` picks the rows: ``smallcnn`` (the default recipe),
``smallcnn-stem-none`` (the default recipe with ``model.stem: none``, the
layout before the stem) and ``resnet18``:

- ``icons``: the Adwaita icon theme (``/usr/share/icons/Adwaita``, Debian's
  ``adwaita-icon-theme``): 6 categories as classes (legacy, status, actions,
  devices, mimetypes, places), each icon once at its largest rendering,
  flattened on white, resized to 96 px colour; at most ``--max-per-class`` per
  class (seeded draw), so the classes stay imbalanced (150..36 by default);
- ``photos``: scikit-learn's two sample photos (``load_sample_images``): 4
  classes (the left and right halves of each photo), ``--photo-patches``
  random square crops of 96-200 px per class, resized to 96 px.

A set whose files are absent is skipped with a message. ``--sets speed``
times training steps (forward, backward, AdamW; random 3-channel batches of
16, ``--cores`` torch threads, best of ``--speed-rounds`` alternating rounds)
of smallcnn with and without its stem and of resnet18 at 96 and 224 px, side
by side in one process.

The last line is ``default recipe vs logistic regression (digits subsets): ratio X``
(the mean test accuracy of the recipe over that of logistic regression), when
the digits ran. No assertions on time or accuracy.

    .venv/bin/python bench/recipe.py [--sets digits,icons,photos,speed] [--seeds 5]
        [--split-seeds 3] [--sizes 100,200,300] [--draws 5] [--no-cv] [--cores 2]
        [--max-per-class 150] [--photo-patches 80] [--real-models smallcnn,resnet18]
        [--backbone-no-sweep] [--speed-rounds 2]
        [--workflow DIR]

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

from imgpipe.stages.demo import digits_images  # noqa: E402

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


def logistic_regression_predictions(
    workdir: Path, colour_size: int | None = None
) -> tuple[pd.Series, np.ndarray]:
    """Logistic regression on the standardised raw pixels, fitted on train + val: (test labels, predictions).

    Grey pixels as stored, or with ``colour_size`` colour pixels resized to that side.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    index = pd.read_csv(workdir / "results/clean/index.csv", dtype={"label": str})
    roles = pd.read_csv(workdir / "results/split/split.csv")
    table = index.merge(roles, on="id")

    def pixels_of(path: str) -> np.ndarray:
        if colour_size is None:
            return cv2.imread(str(workdir / path), cv2.IMREAD_GRAYSCALE).reshape(-1)
        image = cv2.imread(str(workdir / path), cv2.IMREAD_COLOR)
        return cv2.resize(image, (colour_size, colour_size), interpolation=cv2.INTER_AREA).ravel()

    pixels = np.stack([pixels_of(path) for path in table["path"]]).astype(np.float64)
    train = table["role"].isin(["train", "val"]).to_numpy()
    test = (table["role"] == "test").to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(pixels[train], table["label"][train])
    return table["label"][test].reset_index(drop=True), model.predict(pixels[test])


def logistic_regression_accuracy(workdir: Path) -> float:
    """Logistic regression on the standardised raw pixels: fitted on train + val, scored on test."""
    truth, predicted = logistic_regression_predictions(workdir)
    return float((predicted == truth).mean())


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


# ---------------------------------------------------------------- real image sets

ADWAITA = Path("/usr/share/icons/Adwaita")
ICON_CLASSES = ("legacy", "status", "actions", "devices", "mimetypes", "places")
REAL_SIZE = 96
LOGREG_SIZE = 32
BACKBONE = "resnet18"
NO_STEM = "smallcnn-stem-none"
REAL_MODELS = ("smallcnn", NO_STEM, BACKBONE)


def largest_icons(category: str) -> dict[str, Path]:
    """Each icon name of an Adwaita category, at its largest PNG rendering (``NxN`` folders)."""
    found: dict[str, tuple[int, Path]] = {}
    for path in ADWAITA.glob(f"*x*/{category}/*.png"):
        side = int(path.parent.parent.name.split("x")[0])
        if path.name not in found or side > found[path.name][0]:
            found[path.name] = (side, path)
    return {name: path for name, (side, path) in sorted(found.items())}


def flattened(path: Path, size: int) -> np.ndarray:
    """A PNG with alpha composited on white, resized to ``size`` px (BGR uint8)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA)
    if image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    if image.dtype != np.uint8:  # 16-bit PNGs
        image = (image / 257).astype(np.uint8)
    alpha = image[:, :, 3:].astype(np.float32) / 255
    bgr = image[:, :, :3].astype(np.float32) * alpha + 255 * (1 - alpha)
    shrink = image.shape[0] > size
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    resized = cv2.resize(bgr, (size, size), interpolation=interpolation)
    return np.clip(resized, 0, 255).round().astype(np.uint8)


def icon_set(max_per_class: int) -> tuple[list[np.ndarray], list[str]] | None:
    """The Adwaita icons by category (at most ``max_per_class`` each), or None without the theme."""
    if not all((ADWAITA / "48x48" / c).is_dir() for c in ICON_CLASSES):
        print(f"icons: skipped, {ADWAITA} (Debian package adwaita-icon-theme) is not installed")
        return None
    rng = np.random.default_rng(0)
    images, labels = [], []
    for category in ICON_CLASSES:
        paths = list(largest_icons(category).values())
        if len(paths) > max_per_class:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), max_per_class, replace=False))]
        images += [flattened(path, REAL_SIZE) for path in paths]
        labels += [category] * len(paths)
    return images, labels


def photo_set(per_class: int) -> tuple[list[np.ndarray], list[str]] | None:
    """Random 96-200 px square crops of the halves of scikit-learn's two sample photos, at 96 px."""
    try:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images()
    except Exception as err:  # noqa: BLE001 - any failure to read them skips the set
        print(f"photos: skipped, scikit-learn's sample images do not load ({err})")
        return None
    rng = np.random.default_rng(0)
    images, labels = [], []
    for filename, photo in zip(photos.filenames, photos.images, strict=True):
        height, width = photo.shape[:2]
        for side_name, left in (("left", 0), ("right", width // 2)):
            half = photo[:, left : left + width // 2]
            for _ in range(per_class):
                side = int(rng.integers(96, 201))
                y = int(rng.integers(0, height - side + 1))
                x = int(rng.integers(0, half.shape[1] - side + 1))
                crop = cv2.resize(
                    half[y : y + side, x : x + side], (REAL_SIZE, REAL_SIZE), cv2.INTER_AREA
                )
                images.append(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
                labels.append(f"{Path(filename).stem}-{side_name}")
    return images, labels


def write_colour_tree(root: Path, images: list[np.ndarray], labels: list[str]) -> Path:
    """The images as ``root/<label>/<n>.png`` (colour)."""
    for n, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{n:04d}.png"), image)
    return root


def final_model_ms_per_image(workdir: Path) -> float:
    """The final model's training time per image seen (ms), from its job summary."""
    summary = json.loads((workdir / "results/train/final/summary.json").read_text())
    return 1000 / summary["images_per_s"] if summary.get("images_per_s") else float("nan")


def trial_val_loss(workdir: Path) -> dict[str, float]:
    """The largest and the last-epoch validation loss over the sweep trials (NaN without a sweep)."""
    histories = [
        pd.read_csv(path)
        for path in sorted((workdir / "results/sweep/trials").glob("*/history.csv"))
    ]
    losses = [h["val_loss"].dropna() for h in histories if "val_loss" in h]
    losses = [loss for loss in losses if len(loss)]
    if not losses:
        return {"trial_val_loss_max": float("nan"), "trial_val_loss_last": float("nan")}
    return {
        "trial_val_loss_max": round(max(float(loss.max()) for loss in losses), 3),
        "trial_val_loss_last": round(max(float(loss.iloc[-1]) for loss in losses), 3),
    }


def real_set_rows(args: argparse.Namespace, scratch: Path) -> pd.DataFrame:
    """One row per (real set, model): the recipe's and logistic regression's test scores."""
    from sklearn.metrics import balanced_accuracy_score

    builders = {
        "icons": lambda: icon_set(args.max_per_class),
        "photos": lambda: photo_set(args.photo_patches),
    }
    rows = []
    for set_name in (s for s in args.sets if s in builders):
        built = builders[set_name]()
        if built is None:
            continue
        for model in args.real_models:
            workdir = copy_workflow(args.workflow, scratch / f"{set_name}-{model}")
            write_colour_tree(workdir / "data", *built)
            config: dict = {"data": {"root": "data"}}
            if model == NO_STEM:
                config["model"] = {"stem": "none"}
            elif model != "smallcnn":
                config["model"] = {"name": model}
                if args.backbone_no_sweep:
                    config["sweep"] = {"enabled": False}
            seconds = run_workflow(workdir, config, [METRICS], args.cores)
            metrics = json.loads((workdir / METRICS).read_text())
            predicted = pd.read_csv(workdir / "results/evaluate/predictions.csv")["predicted"]
            truth, logreg = logistic_regression_predictions(workdir, LOGREG_SIZE)
            counts = pd.Series(built[1]).value_counts()
            row = {
                "set": set_name,
                "model": model
                + (" (no sweep)" if model == BACKBONE and args.backbone_no_sweep else ""),
                "images": len(built[1]),
                "classes": f"{len(counts)} ({counts.max()}..{counts.min()})",
                "test_acc": round(float(metrics["accuracy"]), 4),
                "balanced_acc": round(float(metrics["balanced_accuracy"]), 4),
                "one_class": "YES" if predicted.nunique() == 1 else "no",
                "logreg_acc": round(float((logreg == truth).mean()), 4),
                "logreg_balanced": round(float(balanced_accuracy_score(truth, logreg)), 4),
                "ms_per_image": round(final_model_ms_per_image(workdir), 2),
                # The sweep trials' validation loss (eval mode, running batch-norm
                # statistics): its worst epoch and its last, over the trials.
                **trial_val_loss(workdir),
                "seconds": round(seconds, 1),
            }
            print("real set", row, flush=True)
            rows.append(row)
            shutil.rmtree(workdir, ignore_errors=True)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- training speed


def training_images_per_s(model, size: int, batch: int = 16, steps: int = 2) -> float:
    """Images/s of training steps (forward, cross-entropy, backward, AdamW) on random batches."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, model.head.out_features, (batch,))
    started = 0.0
    for step in range(steps + 1):  # the first step warms up (allocations, kernels)
        if step == 1:
            started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


SPEED_MODELS = (
    ("smallcnn (stem auto)", "smallcnn", "auto"),
    ("smallcnn (stem none)", "smallcnn", "none"),
    (BACKBONE, BACKBONE, "auto"),
)


def speed_rows(args: argparse.Namespace) -> pd.DataFrame:
    """Training images/s on the CPU of smallcnn (stem auto / none) and resnet18 at 96 and 224 px.

    The models alternate over ``--speed-rounds`` rounds and each keeps its best
    round, so load from other processes biases no model more than another.
    """
    import torch

    from imgpipe.learn.factory import build_model

    torch.set_num_threads(args.cores)
    best: dict[tuple[int, str], float] = {}
    for _ in range(args.speed_rounds):
        for size in (96, 224):
            for label, name, stem in SPEED_MODELS:
                torch.manual_seed(0)
                model = build_model(name, 6, 3, size, stem=stem)
                speed = training_images_per_s(model, size)
                print("speed", {"size": size, "model": label, "images_per_s": speed}, flush=True)
                best[size, label] = max(best.get((size, label), 0.0), speed)
    table = pd.DataFrame(
        [{"size": size, "model": label, "images_per_s": v} for (size, label), v in best.items()]
    )
    backbone = table[table["model"] == BACKBONE].set_index("size")["images_per_s"]
    table["vs_resnet18"] = table["images_per_s"] / table["size"].map(backbone)
    return table.round(2)


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
    parser.add_argument(
        "--sets",
        default="digits,icons,photos,speed",
        help="comma-separated parts to run: digits (demo and subsets), icons, photos, speed",
    )
    parser.add_argument("--speed-rounds", type=int, default=2, help="alternating speed rounds")
    parser.add_argument("--max-per-class", type=int, default=150, help="icons per category")
    parser.add_argument("--photo-patches", type=int, default=80, help="photo crops per class")
    parser.add_argument(
        "--real-models",
        default=f"smallcnn,{BACKBONE}",
        help=f"models run on the real sets: {', '.join(REAL_MODELS)} "
        "(the default recipe, the default recipe with model.stem none, resnet18 from scratch)",
    )
    parser.add_argument(
        "--backbone-no-sweep",
        action="store_true",
        help="resnet18 rows with sweep.enabled false (one training at train.lr 0.01)",
    )
    args = parser.parse_args()
    args.sets = [s for s in args.sets.split(",") if s]
    unknown = sorted(set(args.sets) - {"digits", "icons", "photos", "speed"})
    if unknown:
        parser.error(f"--sets: unknown part(s) {', '.join(unknown)}")
    args.real_models = [m for m in args.real_models.split(",") if m]
    odd = sorted(set(args.real_models) - set(REAL_MODELS))
    if odd:
        parser.error(f"--real-models: unknown model(s) {', '.join(odd)}")
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.workflow = args.workflow.resolve()
    return args


def main() -> None:
    """Run the grid and print both tables and the closing ratio."""
    args = parse_args()
    digits = "digits" in args.sets
    with tempfile.TemporaryDirectory(prefix="imgpipe-recipe-") as tmp:
        run_demo = digits and args.seeds and args.split_seeds
        demo = demo_rows(args, Path(tmp)) if run_demo else pd.DataFrame()
        run_subsets = digits and args.sizes and args.draws
        subsets = subset_rows(args, Path(tmp)) if run_subsets else pd.DataFrame()
        real = real_set_rows(args, Path(tmp))
    speed = speed_rows(args) if "speed" in args.sets else pd.DataFrame()
    print(f"\nworkflow: {args.workflow}")
    if len(demo):
        print("\ndemo (1,797 digits), default recipe:")
        print(demo.to_string(index=False))
        mean, low, cv = demo["test_acc"].mean(), demo["test_acc"].min(), demo["cv_acc"].mean()
        print(
            f"test accuracy mean {mean:.4f} (goal >= 0.985), min {low:.4f} (goal >= 0.98), "
            f"CV mean {cv:.4f} (goal within +-0.01 of the test mean: {cv - mean:+.4f})"
        )
    if len(speed):
        print(
            f"\ntraining speed on the CPU ({args.cores} threads, batch 16, best round, images/s):"
        )
        print(speed.to_string(index=False))
    if len(real):
        print("\nreal image sets, default recipe and resnet18 from scratch vs logistic regression:")
        print(real.to_string(index=False))
    if len(subsets):
        print("\nclass-balanced digits subsets, default recipe vs logistic regression:")
        by_size = subsets.groupby("images")[["recipe_acc", "logreg_acc", "seconds"]].mean()
        print(by_size.round(4).to_string())
        ratio = subsets["recipe_acc"].mean() / subsets["logreg_acc"].mean()
        print(f"default recipe vs logistic regression (digits subsets): ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
