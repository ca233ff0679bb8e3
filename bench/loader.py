"""Benchmark: imgpipe's training loader against torchvision ImageFolder + DataLoader, on photos.

Generates (or reuses, ``--data DIR``) a tree of 256 x 256 RGB JPEGs (10
classes, smooth random colour fields with grain: ~20 KB each, like small
photos) and ingests it with imgpipe's own functions (listing, ``image.size:
auto`` -> 224 px rgb, ``imgpipe.data.ingest.index_shard`` in 2 processes, like the
workflow). A user who sets only ``data.root`` on such photos gets exactly this:
224 px arrays, and an ImageNet-style random resized crop back to 224 px.

Default: training batches of 224 px with a random horizontal flip and a random
resized crop (area [0.08, 1], aspect [3/4, 4/3]), normalised, as float tensors
on the CPU, from both sides in one run:

(a) imgpipe: ``ImageDataModule`` training loader (index batches read from the
    shards with pread) + ``ImageClassifier.preprocess(x, augment=True)`` (the
    on-device augmentation, here on the CPU);
(b) torchvision: ``ImageFolder`` + ``DataLoader`` with ``RandomResizedCrop(224)``,
    ``RandomHorizontalFlip``, ``ToImage`` + ``ToDtype(float32, scale=True)``,
    ``Normalize`` (PIL decode every epoch), at each num_workers in --workers,
    the best one counting.

Each measurement runs in a fresh subprocess with the same torch threads;
images/s = images after the first (warm-up) batch / seconds, over
--max-batches batches (0: the whole epoch). The sides alternate --repeats
times (a busy spell on a shared machine hits both) and each side's best run
counts. Prints both sides and ends with ``loader vs ImageFolder: ratio X``.

``--rss``: peak RSS (VmHWM) of a training job (``imgpipe.learn.fit.fit``, one
whole epoch, no validation, like train_final; the flip + crop policy; a model
that pools 8 x 8 before its one convolution, so that the loader dominates) on
10,000 and on 40,000 such images (224 px rgb shards written directly from the
ingested images: the ingest output of that many photos), same batch; ends
with ``rss 40k vs 10k: ratio X``.

``--epoch``: one CPU epoch of resnet18 at 128 px (--epoch-images images
ingested at image.size 128) through the real loader and preprocessing (with
the flip + random resized crop) against the same model and steps fed
pre-made normalised tensors (compute only); ends with
``epoch loader vs pre-made tensors: ratio X``.

``--gpu``: the same comparisons with the batches copied to cuda (pinned memory,
non-blocking, uint8 on the wire) and the augmentation and model on the GPU.

    .venv/bin/python bench/loader.py                  # --n 4000, 20 batches per run: ~3 min
    .venv/bin/python bench/loader.py --n 20000 --max-batches 0   # the issue's size, whole epochs
    .venv/bin/python bench/loader.py --rss            # 10,000 vs 40,000 images (up to 6 GB of temp files)
    .venv/bin/python bench/loader.py --epoch          # resnet18, 128 px, 384 images
    .venv/bin/python bench/loader.py --gpu --n 20000 [--rss] [--epoch]
    --data DIR keeps the JPEG tree there for the next run.
No assertions; run with the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLASSES = 10
SIDE = 256
BATCH = 128
FRESH_PROCESSES = multiprocessing.get_context("spawn")
# flip + ImageNet-style random resized crop, nothing else (torchvision's pair).
CROP_FLIP = {
    "on_device": True,
    "crop_area": [0.08, 1.0],
    "crop_ratio": [0.75, 4 / 3],
    "scale": [1.0, 1.0],
    "rotation": 0.0,
    "translate": 0.0,
    "hflip": True,
    "vflip": False,
    "brightness": 0.0,
    "contrast": 0.0,
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------- data


def _write_jpegs(args: tuple[str, int, int, int]) -> None:
    root, start, stop, seed = args
    rng = np.random.default_rng(seed)
    grain = [rng.normal(0, 8, (SIDE, SIDE, 3)).astype(np.int16) for _ in range(8)]
    for k in range(start, stop):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (SIDE, SIDE), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        image = np.clip(image + grain[k % len(grain)], 0, 255).astype(np.uint8)
        folder = Path(root) / f"class{k % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{k:06d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])


def make_jpegs(root: Path, n: int, processes: int = 2) -> float:
    """Write n 256 px RGB JPEGs under root/class<c>/ (reused when already there); return seconds."""
    stamp = root / ".complete"
    if stamp.is_file() and stamp.read_text() == str(n):
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    bounds = np.linspace(0, n, 8 * processes + 1).astype(int)
    jobs = [
        (str(root), int(a), int(b), i)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]
    with ProcessPoolExecutor(processes, mp_context=FRESH_PROCESSES) as pool:
        list(pool.map(_write_jpegs, jobs))
    stamp.write_text(str(n))
    return time.perf_counter() - start


def ingest(root: Path, work: Path, size: int | str = "auto", shards: int = 2) -> dict:
    """List and ingest ``root`` as the workflow does (image.size ``size``, mode auto) into ``work``.

    Writes ``work/index.csv`` (the ok rows: label, array, row; clean is not run)
    and returns the resolved image settings and the seconds taken.
    """
    from imgpipe.data.image_settings import resolve_settings
    from imgpipe.data.ingest import ingest_listing, load_stats
    from imgpipe.data.listing import list_images

    start = time.perf_counter()
    files = list_images(root, [".jpg"])
    work.mkdir(parents=True, exist_ok=True)
    files.to_csv(work / "files.csv", index=False)
    ok = files.loc[files["status"] == "ok", "path"].tolist()
    settings = resolve_settings({"size": size, "mode": "auto", "fit": "pad"}, ok)
    ingest_listing(work / "files.csv", settings, 10**8, work, shards)
    parts = []
    for s in range(shards):
        stats = load_stats(work / f"shard-{s}" / "stats.csv")
        stats = stats[stats["status"] == "ok"]
        parts.append(
            pd.DataFrame(
                {
                    "label": stats["label"].to_numpy(),
                    "array": str(work / f"shard-{s}" / "images.npy"),
                    "row": stats["row"].to_numpy(dtype=np.int64),
                    "relpath": stats["relpath"].to_numpy(),
                }
            )
        )
    index = pd.concat(parts).sort_values("relpath", ignore_index=True)
    index.insert(0, "id", np.arange(len(index)))
    index.to_csv(work / "index.csv", index=False)
    return {
        "size": settings["size"],
        "mode": settings["mode"],
        "images": len(index),
        "seconds": time.perf_counter() - start,
    }


def load_index(work: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The bench index (id, label, array, row) and its integer labels."""
    from imgpipe.data.dataset import label_codes

    index = pd.read_csv(work / "index.csv", dtype={"label": str, "array": str})
    return index, label_codes(index)


# ----------------------------------------------------------------------------- children


def child(argv: list[str], timeout: float = 3600) -> dict:
    """Run this script with ``argv`` in a fresh process; return the JSON of its last line."""
    proc = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_preprocessor(channels: int, size: int, device: str):
    """An ImageClassifier whose preprocess is the training path (flip + crop, ImageNet normalisation)."""
    from imgpipe.learn.classifier_module import ImageClassifier

    module = ImageClassifier(
        {"name": "smallcnn", "channels": [8], "dropout": 0.0},
        {"lr": 0.01},
        num_classes=CLASSES,
        in_channels=channels,
        image_size=size,
        mean=IMAGENET_MEAN[:channels],
        std=IMAGENET_STD[:channels],
        augment_cfg=CROP_FLIP,
    )
    return module.to(device)


def time_batches(batches, device: str, max_batches: int, transform) -> dict:
    """Images/s of a loader's batches moved to the device and transformed (the first batch warms up)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seen, start, shape = 0, None, None
    for step, (x, _) in enumerate(batches):
        x = x.to(device, non_blocking=True)
        shape = tuple(transform(x).shape)
        if step == 0:
            sync()
            start = time.perf_counter()
            continue
        seen += len(x)
        if step == max_batches:
            break
    sync()
    seconds = time.perf_counter() - start
    return {
        "images_per_s": seen / seconds,
        "seconds": seconds,
        "images": seen,
        "batch_shape": shape,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_imgpipe_loader(
    work: Path, batch: int, workers: int, device: str, max_batches: int = 0
) -> dict:
    """Images/s of imgpipe's training loader + on-device preprocessing (an epoch, or max_batches)."""

    from imgpipe.data.dataset import ShardImages
    from imgpipe.learn.image_datamodule import ImageDataModule

    index, labels = load_index(work)
    images = ShardImages(index)
    data = ImageDataModule(
        images,
        labels,
        np.arange(len(index)),
        [],
        batch_size=batch,
        num_workers=workers,
        pin_memory=device == "cuda",
    )
    module = make_preprocessor(images.shape[3], images.shape[1], device)
    return time_batches(
        data.train_dataloader(), device, max_batches, lambda x: module.preprocess(x, augment=True)
    )


def run_torchvision_loader(
    root: Path, batch: int, workers: int, device: str, max_batches: int = 0
) -> dict:
    """Images/s of ImageFolder + DataLoader with the same crop, flip and normalisation."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
    )
    return time_batches(loader, device, max_batches, lambda x: x)


def tiny_net(num_classes: int, in_channels: int, image_size: int):
    """model.name ``loader:tiny_net``: pools 8x8 first, so the loader, not the model, is measured."""
    from torch import nn

    return nn.Sequential(
        nn.AvgPool2d(8),
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def run_fit_rss(work: Path, batch: int) -> dict:
    """A train_final-like job: fit() for one epoch on every image, no validation; its peak RSS."""
    from imgpipe.data.dataset import ShardImages
    from imgpipe.learn.fit import fit

    index, labels = load_index(work)
    images = ShardImages(index)
    # This file as a model factory module (bench/ is the script's folder, on sys.path).
    model_cfg = {"name": "loader:tiny_net", "normalize": "data"}
    train_cfg = {
        "max_epochs": 1,
        "batch_size": batch,
        "lr": 0.01,
        "schedule": "none",
        "early_stopping_patience": 0,
        "deterministic": False,
        "threads": int(os.environ.get("BENCH_THREADS", "2")),
    }
    with tempfile.TemporaryDirectory() as out:
        summary = fit(
            images,
            labels,
            np.arange(len(index)),
            [],
            None,
            None,
            model_cfg,
            train_cfg,
            out,
            augment_cfg=CROP_FLIP,
        )
    return {
        "images": len(index),
        "peak_rss_mb": peak_rss_mb(),
        "train_seconds": summary["train_seconds"],
        "images_per_s": summary["images_per_s"],
    }


def run_epoch(work: Path, batch: int, device: str, source: str) -> dict:
    """One epoch of resnet18 (AdamW steps) fed by the real loader or by pre-made tensors."""
    import torch
    from torch.nn import functional as F

    from imgpipe.data.dataset import ShardImages
    from imgpipe.learn.image_datamodule import ImageDataModule

    torch.manual_seed(0)
    index, labels = load_index(work)
    images = ShardImages(index)
    module = make_preprocessor(images.shape[3], images.shape[1], device)
    from imgpipe.learn.factory import build_model

    model = build_model("resnet18", CLASSES, images.shape[3], images.shape[1]).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
        module.channels_last = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = ImageDataModule(
        images,
        labels,
        np.arange(len(index)),
        [],
        batch_size=batch,
        pin_memory=device == "cuda",
    )
    loader = data.train_dataloader()
    if source == "tensors":  # the same batches, read and preprocessed beforehand
        batches = [(module.preprocess(x.to(device), augment=True), y.to(device)) for x, y in loader]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast:
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    first = batches[0] if source == "tensors" else None
    if first is not None:  # warm-up step outside the timing, as for the loader
        step(*first)
    seen = 0
    sync()
    start = time.perf_counter()
    if source == "tensors":
        for x, y in batches[1:]:
            step(x, y)
            seen += len(y)
    else:
        for k, (x, y) in enumerate(loader):
            x = module.preprocess(x.to(device, non_blocking=True), augment=True)
            y = y.to(device, non_blocking=True)
            if k == 0:
                step(x, y)
                sync()
                start = time.perf_counter()
                continue
            step(x, y)
            seen += len(y)
    sync()
    seconds = time.perf_counter() - start
    return {"images_per_s": seen / seconds, "seconds": seconds, "images": seen}


def run_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    work, device = Path(args.work or "."), args.device
    if args.child == "imgpipe":
        result = run_imgpipe_loader(work, args.batch, args.workers_one, device, args.max_batches)
    elif args.child == "torchvision":
        result = run_torchvision_loader(
            Path(args.data), args.batch, args.workers_one, device, args.max_batches
        )
    elif args.child == "rss":
        result = run_fit_rss(work, args.batch)
    else:
        result = run_epoch(work, args.batch, device, args.child.split("-", 1)[1])
    print(json.dumps(result))


# ----------------------------------------------------------------------------- parts


def compare_loaders(args: argparse.Namespace, root: Path, work: Path, device: str) -> None:
    made = make_jpegs(root, args.n)
    if made:
        print(f"wrote {args.n} JPEGs of {SIDE} px RGB in {made:.0f} s under {root}")
    facts = ingest(root, work / "loader")
    print(
        f"ingested {facts['images']} images at image.size auto -> {facts['size']} px "
        f"{facts['mode']} in {facts['seconds']:.0f} s"
    )
    common = ["--threads", str(args.threads), "--batch", str(args.batch), "--device", device]
    common += ["--max-batches", str(args.max_batches)]
    ours: dict[int, list[dict]] = {w: [] for w in args.workers}
    theirs: dict[int, list[dict]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):  # alternate the sides: a busy spell hits both
        for workers in args.workers:
            ours[workers].append(
                child(
                    ["--child", "imgpipe", "--work", str(work / "loader")]
                    + ["--workers-one", str(workers), *common]
                )
            )
            theirs[workers].append(
                child(
                    ["--child", "torchvision", "--data", str(root)]
                    + ["--workers-one", str(workers), *common]
                )
            )
    print(
        f"\ntraining batches of {args.batch} x 224 px, flip + random resized crop, normalised, "
        f"float on {device}; {args.threads} torch threads"
    )
    print(f"{'':28s}{'workers':>8s}{'images/s':>10s}{'s':>7s}{'peak RSS MB':>13s}   (every run)")
    best = {}
    for name, runs in (("imgpipe loader + preprocess", ours), ("torchvision ImageFolder", theirs)):
        for workers, repeats in runs.items():
            r = max(repeats, key=lambda m: m["images_per_s"])
            every = ", ".join(f"{m['images_per_s']:.0f}" for m in repeats)
            print(
                f"{name:28s}{workers:8d}{r['images_per_s']:10.0f}{r['seconds']:7.2f}"
                f"{r['peak_rss_mb']:13.0f}   ({every})"
            )
            if r["images_per_s"] > best.get(name, {"images_per_s": 0})["images_per_s"]:
                best[name] = r
    ours_best, theirs_best = best["imgpipe loader + preprocess"], best["torchvision ImageFolder"]
    print(
        f"images per run: {ours_best['images']} vs {theirs_best['images']}; batch shapes: "
        f"{ours_best['batch_shape']} vs {theirs_best['batch_shape']}"
    )
    ratio = ours_best["images_per_s"] / theirs_best["images_per_s"]
    print(f"loader vs ImageFolder: ratio {ratio:.2f}")


def write_rss_shards(source: Path, work: Path, n: int, shards: int = 2) -> None:
    """An ingest output of n images (224 px rgb shards + index) made from an ingested tree's images.

    The rows repeat the source's images (their content does not matter for
    memory); each of the n rows is its own row on disk.
    """
    from imgpipe.data.dataset import ShardImages

    index, _ = load_index(source)
    images = ShardImages(index)
    work.mkdir(parents=True, exist_ok=True)
    parts = []
    for s in range(shards):
        rows = np.arange(s, n, shards)
        path = work / f"shard-{s}.npy"
        array = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.uint8, shape=(len(rows), *images.shape[1:])
        )
        for start in range(0, len(rows), 1024):
            ids = rows[start : start + 1024] % len(images)
            array[start : start + len(ids)] = images[ids]
        array.flush()
        del array
        labels = index["label"].to_numpy()[rows % len(images)]
        parts.append(
            pd.DataFrame({"label": labels, "array": str(path), "row": np.arange(len(rows))})
        )
    table = pd.concat(parts, ignore_index=True)
    table.insert(0, "id", np.arange(len(table)))
    table.to_csv(work / "index.csv", index=False)


def compare_rss(args: argparse.Namespace, root: Path, work: Path) -> None:
    sizes = args.rss_sizes
    source_n = min(args.n, 4000)
    made = make_jpegs(root, max(source_n, args.n))
    if made:
        print(f"wrote {args.n} JPEGs in {made:.0f} s")
    if not (work / "loader" / "index.csv").is_file():
        ingest(root, work / "loader")
    results = {}
    for n in sizes:
        folder = work / f"rss-{n}"
        write_rss_shards(work / "loader", folder, n)
        results[n] = child(
            [
                "--child",
                "rss",
                "--work",
                str(folder),
                "--threads",
                str(args.threads),
                "--batch",
                str(args.batch),
            ]
        )
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\ntraining job (fit, 1 epoch, batch {args.batch}, 224 px rgb, flip + crop):")
    for n, r in results.items():
        print(
            f"  {n:6d} images: peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"{r['images_per_s']:.0f} images/s, {r['train_seconds']:.0f} s"
        )
    small, large = sizes
    ratio = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
    print(f"rss {large // 1000}k vs {small // 1000}k: ratio {ratio:.3f}")


def compare_epoch(args: argparse.Namespace, root: Path, work: Path, device: str) -> None:
    made = make_jpegs(root, max(args.n, args.epoch_images))
    if made:
        print(f"wrote JPEGs in {made:.0f} s")
    sub = work / "epoch-jpegs"  # the first --epoch-images of the tree
    for path in sorted(root.rglob("*.jpg"))[: args.epoch_images]:
        target = sub / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    facts = ingest(sub, work / "epoch", size=128)
    common = [
        "--work",
        str(work / "epoch"),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.epoch_batch),
        "--device",
        device,
    ]
    loader = child(["--child", "epoch-loader", *common])
    tensors = child(["--child", "epoch-tensors", *common])
    print(
        f"\nresnet18, {facts['images']} images at 128 px, batch {args.epoch_batch}, one epoch on "
        f"{device} ({args.threads} threads):"
    )
    for name, r in (("real loader + preprocess", loader), ("pre-made tensors", tensors)):
        print(
            f"  {name:26s} {r['images_per_s']:8.1f} images/s  {r['seconds']:7.2f} s "
            f"({r['images']} images timed after a warm-up batch)"
        )
    ratio = loader["images_per_s"] / tensors["images_per_s"]
    print(f"epoch loader vs pre-made tensors: ratio {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="JPEGs in the loader comparison")
    parser.add_argument("--data", help="folder for the JPEG tree (kept; default: a temp folder)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--max-batches", type=int, default=20, help="batches timed per run (0: a whole epoch)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, best counts")
    parser.add_argument("--rss", action="store_true", help="peak RSS at 10,000 vs 40,000 images")
    parser.add_argument("--rss-sizes", type=int, nargs=2, default=[10_000, 40_000])
    parser.add_argument("--epoch", action="store_true", help="resnet18 epoch: loader vs tensors")
    parser.add_argument("--epoch-images", type=int, default=384)
    parser.add_argument("--epoch-batch", type=int, default=64)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--workers-one", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
    temp = tempfile.mkdtemp(prefix="imgpipe-bench-loader-")
    root = Path(args.data) if args.data else Path(temp) / "jpegs"
    work = Path(temp) / "work"
    try:
        if args.epoch:
            compare_epoch(args, root, work, device)
        if args.rss:
            compare_rss(args, root, work)
        if not (args.epoch or args.rss):
            compare_loaders(args, root, work, device)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
