"""Benchmark: our Lightning ``fit`` against a minimal hand-written PyTorch loop, same work.

Both train the model of config/config.yaml on the digits (resized to 16 px,
optionally replicated ``--scale`` times) with the same batch size, epochs,
optimiser, schedule, on-device augmentation, per-epoch validation and torch
threads. Images/s = training images processed / seconds of the training loop
(validation included, for both). Also timed: Lightning with stock Trainer
settings (progress bar, sanity check, model summary, logging every step), to
show what ``fit``'s settings save. Prints figures and ratios; no assertions.

    .venv/bin/python bench/train.py [--epochs 3] [--threads 2] [--scale 1] [--repeats 2]
    .venv/bin/python bench/train.py --gpu --scale 20   # data resident on the GPU,
                                                       # channels_last, bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pytorch_lightning as pl  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from imgpipe.data.dataset import channel_stats  # noqa: E402
from imgpipe.learn.classifier_module import ImageClassifier  # noqa: E402
from imgpipe.learn.fit import fit  # noqa: E402
from imgpipe.learn.image_datamodule import ImageDataModule  # noqa: E402
from imgpipe.stages.demo import digits_images  # noqa: E402


def dataset(scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    images, labels = digits_images()
    images = np.stack([cv2.resize(im, (16, 16), interpolation=cv2.INTER_LINEAR) for im in images])
    images = np.tile(images[:, :, :, None], (scale, 1, 1, 1))
    labels = np.tile(labels, scale)
    order = np.random.default_rng(0).permutation(len(labels))
    n_val = len(labels) // 6
    return images, labels, np.sort(order[n_val:]), np.sort(order[:n_val])


def build(images, labels, train_ids, model_cfg, train_cfg) -> ImageClassifier:
    mean, std = channel_stats(images[train_ids])
    return ImageClassifier(
        model_cfg, train_cfg, int(labels.max()) + 1, images.shape[3], images.shape[1], mean, std
    )


def hand_loop(images, labels, train_ids, val_ids, model_cfg, train_cfg, gpu: bool) -> dict:
    """The same training, written directly: tensors indexed per batch, no framework."""
    torch.manual_seed(train_cfg["seed"])
    device = torch.device("cuda" if gpu else "cpu")
    module = build(images, labels, train_ids, model_cfg, train_cfg).to(device)
    if gpu:
        module = module.to(memory_format=torch.channels_last)
    x_train = torch.from_numpy(images[train_ids].transpose(0, 3, 1, 2).copy()).to(device)
    y_train = torch.from_numpy(labels[train_ids]).to(device)
    x_val = torch.from_numpy(images[val_ids].transpose(0, 3, 1, 2).copy()).to(device)
    y_val = torch.from_numpy(labels[val_ids]).to(device)
    bs, epochs = train_cfg["batch_size"], train_cfg["max_epochs"]
    steps_per_epoch = len(y_train) // bs
    decay = [p for p in module.parameters() if p.ndim > 1]
    rest = [p for p in module.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": train_cfg["weight_decay"]},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=train_cfg["lr"],
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train_cfg["lr"], total_steps=steps_per_epoch * epochs
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu)
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        module.train()
        order = torch.randperm(len(y_train), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * bs : (step + 1) * bs]
            x = module.preprocess(x_train[idx], augment=True)
            with autocast:
                loss = F.cross_entropy(
                    module(x), y_train[idx], label_smoothing=train_cfg["label_smoothing"]
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(idx)
        module.eval()
        correct = torch.zeros((), device=device)
        with torch.no_grad(), autocast:
            for s in range(0, len(y_val), 512):
                logits = module(module.preprocess(x_val[s : s + 512]))
                correct += (logits.argmax(1) == y_val[s : s + 512]).sum()
        val_acc = correct.item() / len(y_val)  # .item() syncs, as logging a metric does
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images_per_s": seen / seconds, "seconds": seconds, "val_acc": val_acc}


def lightning_fit(images, labels, train_ids, val_ids, model_cfg, train_cfg) -> dict:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = fit(images, labels, train_ids, val_ids, None, None, model_cfg, train_cfg, out)
        total = time.perf_counter() - started
    return {
        "images_per_s": summary["images_per_s"],
        "seconds": summary["train_seconds"],
        "fit_seconds": total,
        "val_acc": summary["best_score"],
    }


def lightning_stock(images, labels, train_ids, val_ids, model_cfg, train_cfg, gpu: bool) -> dict:
    """Lightning with its default Trainer conveniences on, to price them."""
    pl.seed_everything(train_cfg["seed"], verbose=False)
    module = build(images, labels, train_ids, model_cfg, train_cfg)
    data = ImageDataModule(images, labels, train_ids, val_ids, batch_size=train_cfg["batch_size"])
    with tempfile.TemporaryDirectory() as out:
        trainer = pl.Trainer(
            accelerator="gpu" if gpu else "cpu",
            devices=1,
            max_epochs=train_cfg["max_epochs"],
            precision="bf16-mixed" if gpu else "32-true",
            default_root_dir=out,
            log_every_n_steps=1,
            use_distributed_sampler=False,
            enable_checkpointing=True,
        )
        start = time.perf_counter()
        # The progress bar still renders (its cost is what is measured), into a buffer.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - start
        val_acc = float(trainer.callback_metrics.get("val_acc", float("nan")))
    seen = (
        train_cfg["max_epochs"]
        * (len(train_ids) // train_cfg["batch_size"])
        * train_cfg["batch_size"]
    )
    return {"images_per_s": seen / seconds, "seconds": seconds, "val_acc": val_acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--scale", type=int, default=1, help="replicate the 1,797 digits this often"
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternate runs, report the best")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--skip-stock", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    model_cfg = config["model"]
    train_cfg = {
        **config["train"],
        "max_epochs": args.epochs,
        "threads": args.threads,
        "early_stopping_patience": 0,
        "schedule": "onecycle",
        "optimizer": "adamw",
        "l1": 0.0,
    }
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device")
    torch.set_num_threads(args.threads)
    images, labels, train_ids, val_ids = dataset(args.scale)
    print(
        f"model {model_cfg['name']} {model_cfg.get('channels')}, {len(train_ids)} train / "
        f"{len(val_ids)} val images, batch {train_cfg['batch_size']}, {args.epochs} epochs, "
        f"{args.threads} threads, {'GPU (bf16, channels_last)' if args.gpu else 'CPU'}"
    )
    runs: dict[str, list[dict]] = {"lightning fit": [], "hand loop": [], "lightning stock": []}
    for _ in range(args.repeats):
        runs["lightning fit"].append(
            lightning_fit(images, labels, train_ids, val_ids, model_cfg, train_cfg)
        )
        runs["hand loop"].append(
            hand_loop(images, labels, train_ids, val_ids, model_cfg, train_cfg, args.gpu)
        )
        if not args.skip_stock:
            runs["lightning stock"].append(
                lightning_stock(images, labels, train_ids, val_ids, model_cfg, train_cfg, args.gpu)
            )
    best = {name: max(r, key=lambda m: m["images_per_s"]) for name, r in runs.items() if r}
    print(f"{'':18s}{'images/s':>10s}{'loop s':>9s}{'val_acc':>9s}   (all runs' images/s)")
    for name, figures in best.items():
        every = ", ".join(f"{m['images_per_s']:.0f}" for m in runs[name])
        print(
            f"{name:18s}{figures['images_per_s']:10.0f}{figures['seconds']:9.2f}"
            f"{figures['val_acc']:9.4f}   ({every})"
        )
    fit_total = best["lightning fit"]["fit_seconds"]
    print(f"fit() end to end (Trainer setup, checkpoint, history): {fit_total:.2f} s")
    if "lightning stock" in best:
        stock = best["lightning stock"]["images_per_s"] / best["hand loop"]["images_per_s"]
        print(f"lightning stock settings vs hand loop: ratio {stock:.2f}")
    # The headline, last: imgpipe's fit() as a speed ratio to the hand-written loop.
    ratio = best["lightning fit"]["images_per_s"] / best["hand loop"]["images_per_s"]
    print(f"lightning fit vs hand loop: ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
