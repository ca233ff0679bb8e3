"""Benchmark: one model through PyTorch eager, TorchScript and ONNX Runtime on the CPU, same threads.

The three are loaded the way ``imgpipe predict`` loads them (``imgpipe.infer.inference.load_model``
on the model.ckpt and on the model.pt / model.onnx that ``imgpipe.infer.export`` writes from it)
and timed on the same uint8 batch through ``Model.probabilities``: pixels in, class
probabilities out, normalisation included, file decoding not. Each runtime is warmed up,
then timed ``--repeats`` times for about ``--seconds`` each; the best round counts.
Prints images/s side by side and their largest probability difference, then the int8
model (``export.quantize: int8``, quantised here with the random batch as calibration: speed
does not depend on it; the export job measures int8 accuracy on the test images) against the
float ONNX model, ``int8 vs float onnxruntime: ratio X``, then
``onnxruntime vs eager: ratio X`` (X > 1: ONNX Runtime is faster).

Then end to end, files on disk to the predictions CSV: ``--files`` JPEGs of ``--file-size``
px (generated) through ``imgpipe.stages.predict.predict_files`` with the ONNX model and
``--workers`` decoding threads, beside a bare decode + resize of the same files (OpenCV
``imread`` + ``resize`` to the model's size) on as many threads; the best of ``--repeats``
each. Ends with ``predict files/s vs decode+resize: ratio X`` (the goal is X >= 0.8: what
prediction adds to reading the files, its checks, the model and the CSV, costs at most a
fifth). No assertions.

    .venv/bin/python bench/predict.py                      # config/config.yaml's model, 16 px grey
    .venv/bin/python bench/predict.py --threads 2 --arch resnet18 --size 64 --mode rgb
    .venv/bin/python bench/predict.py --model results/train/final/model.ckpt
    .venv/bin/python bench/predict.py --files 2000 --file-size 256 --workers 2

Without ``--model`` the network is built untrained (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imgpipe.cli import default_workers  # noqa: E402
from imgpipe.infer.export import export_onnx, export_torchscript, max_difference  # noqa: E402
from imgpipe.infer.inference import load_model  # noqa: E402


def untrained_model_file(path: Path, arch: str, size: int, mode: str, classes: int) -> Path:
    """A model.ckpt of config/config.yaml's model section (name overridden by ``arch``), untrained."""
    from imgpipe.learn.classifier_module import ImageClassifier
    from imgpipe.learn.fit import METADATA_KEY, model_metadata

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    model_cfg = {**config["model"], "name": arch or config["model"]["name"]}
    channels = 3 if mode == "rgb" else 1
    module = ImageClassifier(
        model_cfg,
        config["train"],
        num_classes=classes,
        in_channels=channels,
        image_size=size,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        class_names=[str(c) for c in range(classes)],
        image_cfg={"size": size, "mode": mode, "fit": "pad"},
    )
    hparams = dict(module.hparams)
    state = {"state_dict": module.state_dict(), "hyper_parameters": hparams}
    state[METADATA_KEY] = model_metadata(hparams)
    torch.save(state, path)
    return path


def images_per_s(model, batch: np.ndarray, seconds: float, repeats: int) -> float:
    """Best of ``repeats`` rounds of about ``seconds`` each (after a warm-up)."""
    for _ in range(3):
        model.probabilities(batch)
    best = 0.0
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            model.probabilities(batch)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, calls * len(batch) / elapsed)
    return best


def write_jpegs(folder: Path, n: int, size: int) -> list[str]:
    """``n`` distinct ``size`` px colour JPEGs (smooth gradients, a block pattern and noise)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    paths = []
    for i in range(n):
        image = np.empty((size, size, 3), np.float32)
        image[..., 0] = ramp[None, :]
        image[..., 1] = ramp[:, None]
        image[..., 2] = np.roll(ramp, i)[None, :]
        blocks = ((np.arange(size)[:, None] // 32 + np.arange(size)[None, :] // 32 + i) % 2) * 60
        image += blocks[..., None] + rng.normal(0, 12, image.shape)
        path = folder / f"{i:05d}.jpg"
        cv2.imwrite(
            str(path), np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90]
        )
        paths.append(str(path))
    return paths


def decode_resize_per_s(paths: list[str], size: int, mode: str, workers: int) -> float:
    """Files/s of a bare OpenCV decode + resize of ``paths`` on ``workers`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    flag = cv2.IMREAD_GRAYSCALE if mode == "gray" else cv2.IMREAD_COLOR

    def one(path: str) -> np.ndarray:
        image = cv2.imread(path, flag)
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)

    start = time.perf_counter()
    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(one, paths, chunksize=16):
                pass
    else:
        for path in paths:
            one(path)
    return len(paths) / (time.perf_counter() - start)


def predict_per_s(model, folder: Path, out: Path, workers: int, batch: int) -> float:
    """Files/s of ``predict_files`` from the folder to the predictions CSV (listing included)."""
    from imgpipe.stages.predict import predict_files

    start = time.perf_counter()
    summary = predict_files(model, folder, out, batch_size=batch, workers=workers)
    elapsed = time.perf_counter() - start
    if summary["predicted"] != summary["files"]:
        raise SystemExit(f"end to end: {summary['rejected']} of the generated files were refused")
    return summary["files"] / elapsed


def end_to_end(model, folder: Path, args: argparse.Namespace) -> None:
    """Print files/s of predicting JPEGs to CSV beside a bare decode + resize; last line the ratio."""
    images = folder / "jpegs"
    paths = write_jpegs(images, args.files, args.file_size)
    image = model.image
    out = folder / "predictions.csv"
    decode_resize_per_s(paths[:200], image["size"], image["mode"], args.workers)  # warm-up
    bare = max(
        decode_resize_per_s(paths, image["size"], image["mode"], args.workers)
        for _ in range(args.repeats)
    )
    single = max(
        predict_per_s(model, images, out, 0, args.batch) for _ in range(max(1, args.repeats - 1))
    )
    pooled = max(
        predict_per_s(model, images, out, args.workers, args.batch) for _ in range(args.repeats)
    )
    print(
        f"end to end: {args.files} JPEGs of {args.file_size} px to CSV, {model.kind} model, "
        f"{args.workers} decoding thread(s)"
    )
    print(f"{'':28s}{'files/s':>10s}{'vs decode':>11s}")
    for name, speed in (
        ("decode+resize (bare)", bare),
        ("predict, 0 workers", single),
        (f"predict, {args.workers} workers", pooled),
    ):
        print(f"{name:28s}{speed:10,.0f}{speed / bare:10.2f}x")
    print(f"predict files/s vs decode+resize: ratio {pooled / bare:.2f}")


def int8_vs_float(folder: Path, float_model, batch: np.ndarray, args: argparse.Namespace) -> float:
    """Quantise ``folder/model.onnx`` to int8 as the export does, time both; print a row, return int8 / float."""
    from imgpipe.infer.quantize import quantize_int8

    int8_path = folder / "model.int8.onnx"
    quantize_int8(folder / "model.onnx", int8_path, batch[:64])
    shutil.copy(folder / "model.onnx.json", folder / "model.int8.onnx.json")  # what it predicts
    int8 = load_model(int8_path, device="cpu", threads=args.threads)
    speed = images_per_s(int8, batch, args.seconds, args.repeats)
    float_speed = images_per_s(float_model, batch, args.seconds, args.repeats)
    diff = max_difference(float_model.probabilities(batch), int8.probabilities(batch))
    size = int8_path.stat().st_size / (folder / "model.onnx").stat().st_size
    print(
        f"{'onnxruntime int8':16s}{speed:12,.0f}{'':10s}{diff:11.1e}  "
        f"(float onnxruntime re-timed: {float_speed:,.0f} images/s; file {size:.2f}x the float's)"
    )
    ratio = speed / float_speed
    print(f"int8 vs float onnxruntime: ratio {ratio:.2f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model.ckpt (default: config/config.yaml's model)")
    parser.add_argument("--arch", default=None, help="network of the untrained model")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--mode", choices=["gray", "rgb"], default="gray")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="threads of every runtime")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=4.0, help="per timed round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", type=int, default=2000, help="JPEGs of the end-to-end run")
    parser.add_argument("--file-size", type=int, default=256, help="side of those JPEGs (px)")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="decoding threads (both sides)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = Path(args.model) if args.model else None
        if path is None:
            path = untrained_model_file(
                folder / "model.ckpt", args.arch, args.size, args.mode, args.classes
            )
        eager = load_model(path, device="cpu")
        export_onnx(eager, folder / "model.onnx")
        export_torchscript(eager, folder / "model.pt")
        runtimes = {
            "pytorch eager": eager,
            "torchscript": load_model(folder / "model.pt", device="cpu", trust_torchscript=True),
            "onnxruntime": load_model(folder / "model.onnx", device="cpu", threads=args.threads),
        }
        image = eager.image
        channels = 3 if image["mode"] == "rgb" else 1
        shape = (args.batch, image["size"], image["size"], channels)
        batch = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        reference = eager.probabilities(batch)
        arch = eager.metadata["architecture"]
        print(
            f"model {arch['name']} ({sum(p.numel() for p in eager.module.parameters()):,} "
            f"parameters), {image['size']} px {image['mode']}, {len(eager.class_names)} classes; "
            f"batch {args.batch}, {args.threads} thread(s), CPU, torch {torch.__version__}, "
            f"{os.cpu_count()} cores"
        )
        print(f"{'runtime':16s}{'images/s':>12s}{'vs eager':>10s}{'max |dp|':>11s}")
        speeds = {}
        for name, model in runtimes.items():
            speeds[name] = images_per_s(model, batch, args.seconds, args.repeats)
            diff = max_difference(reference, model.probabilities(batch))
            ratio = speeds[name] / speeds["pytorch eager"]
            print(f"{name:16s}{speeds[name]:12,.0f}{ratio:9.2f}x{diff:11.1e}")
        int8_vs_float(folder, runtimes["onnxruntime"], batch, args)
        print(f"onnxruntime vs eager: ratio {speeds['onnxruntime'] / speeds['pytorch eager']:.2f}")
        end_to_end(runtimes["onnxruntime"], folder, args)


if __name__ == "__main__":
    main()
