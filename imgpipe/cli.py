"""The ``imgpipe`` command (no Snakemake needed): ``imgpipe predict MODEL INPUT -o predictions.csv``.

MODEL is a ``model.ckpt`` (results/train/final/), or an exported ``model.onnx``
(ONNX Runtime) or ``model.pt`` (TorchScript) with its ``.json`` sidecar beside
it. INPUT is a folder (any layout) or a CSV manifest with columns
``path,label`` (labels may be empty). Files are decoded by ``--workers``
threads and stream through the model in batches into a CSV, JSON or Parquet
file (``--format``, else the output's suffix): the top ``--topk`` classes with
their probabilities (or logits: ``--output-type logit``); a file that cannot be
predicted is a row with its reason. A progress line (files, rate, time left)
goes to stderr every few seconds unless ``--quiet``. For a labelled input (a
``<class>/<image>`` tree or a labelled manifest) the accuracy and macro F1 are
printed and written beside the predictions, in ``<output stem>.metrics.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from imgpipe.core.errors import DataError


def factory_name(text: str) -> str:
    """``--model-factory``'s value: a ``package.module:factory`` name."""
    from imgpipe.infer.modelfile import is_factory_name

    if not is_factory_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not package.module:factory")
    return text


# --workers' default: one decoding thread per core, at most this many.
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """Decoding threads when --workers is not given: the usable cores, at most MAX_DEFAULT_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (argparse type)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is less than {low}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command-line parser of ``imgpipe``."""
    from imgpipe import __version__
    from imgpipe.infer.inference import OUTPUT_TYPES
    from imgpipe.infer.output import FORMATS
    from imgpipe.stages.predict import TOP_K

    top = argparse.ArgumentParser(prog="imgpipe", description="Use a trained imgpipe model.")
    top.add_argument("--version", action="version", version=f"imgpipe {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser(
        "predict",
        help="predict the images of a folder or CSV manifest",
        description="Predict every image of a folder or CSV manifest into a CSV, JSON or "
        "Parquet file.",
    )
    predict.add_argument(
        "model", help="model.ckpt, or model.onnx / model.pt with its .json sidecar"
    )
    predict.add_argument("input", help="image folder (any layout) or CSV manifest (path,label)")
    predict.add_argument(
        "-o", "--output", required=True, help="predictions file to write (.csv, .json, .parquet)"
    )
    predict.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output format (default: by the output's suffix; csv for any other)",
    )
    predict.add_argument(
        "--topk",
        type=positive_int,
        default=TOP_K,
        metavar="K",
        help=f"classes per row, best first (default {TOP_K}; at most the class count)",
    )
    predict.add_argument(
        "--output-type",
        choices=OUTPUT_TYPES,
        default="prob",
        help="prob: softmax probabilities (default); logit: the model's logits "
        "(of an exported file: log-probabilities, the logits less a per-image constant)",
    )
    predict.add_argument(
        "--batch-size", type=positive_int, default=256, help="images per batch (default 256)"
    )
    predict.add_argument(
        "--device",
        default=None,
        metavar="cpu|cuda|cuda:N",
        help="where the model runs (default: cuda when available, else cpu)",
    )
    predict.add_argument(
        "--workers",
        type=non_negative_int,
        default=default_workers(),
        metavar="N",
        help="threads decoding the files (0: the main thread; default: one per CPU core, "
        f"at most {MAX_DEFAULT_WORKERS}, here {default_workers()})",
    )
    predict.add_argument("--threads", type=int, default=None, help="CPU threads of the model")
    predict.add_argument(
        "--montage", default=None, help="also write a PNG of the most and least confident images"
    )
    predict.add_argument(
        "--metrics",
        default=None,
        help="summary / metrics JSON (default: <output stem>.metrics.json beside the output)",
    )
    predict.add_argument(
        "--model-factory",
        default=None,
        type=factory_name,
        metavar="PKG.MOD:FACTORY",
        help="for a model trained from your own package.module:factory: name it again "
        "(a model file never chooses code to run; it must be the file's factory)",
    )
    predict.add_argument(
        "--trust-torchscript",
        action="store_true",
        help="load a TorchScript model.pt: it is a program, so only a file you trust "
        "(the exported model.onnx needs no such trust)",
    )
    predict.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read symlinks whose target lies outside INPUT (default: refused as outside_root)",
    )
    predict.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines or log on stderr"
    )
    return top


def metrics_path(output: str, given: str | None) -> Path:
    """Where the summary goes: ``given``, else ``<output stem>.metrics.json`` beside the output."""
    if given:
        return Path(given)
    out = Path(output)
    return out.with_name(f"{out.stem}.metrics.json")


def predict_command(args: argparse.Namespace) -> int:
    """Run ``imgpipe predict``; print the counts (and accuracy / macro F1 of a labelled input)."""
    from imgpipe.infer.inference import load_model
    from imgpipe.stages.predict import predict_files

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # No --device: cuda when torch sees a GPU (an ONNX model: the CPU).
    model = load_model(
        args.model,
        device=args.device,
        threads=args.threads,
        model_factory=args.model_factory,
        trust_torchscript=args.trust_torchscript,
    )
    summary = predict_files(
        model,
        args.input,
        args.output,
        batch_size=args.batch_size,
        montage=args.montage,
        metrics=metrics_path(args.output, args.metrics),
        follow_symlinks=args.follow_symlinks,
        topk=args.topk,
        output_type=args.output_type,
        output_format=args.format,
        workers=args.workers,
    )
    rejected = summary["rejected"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in rejected.items())
    print(f"{summary['files']} files: {summary['predicted']} predicted", end="")
    print(f", {sum(rejected.values())} rejected ({reasons})" if rejected else "")
    print(f"predictions: {args.output}")
    print(f"summary: {metrics_path(args.output, args.metrics)}")
    if summary.get("metrics"):
        found = summary["metrics"]
        print(
            f"accuracy {found['accuracy']:.4f}, macro F1 {found['f1_macro']:.4f} "
            f"({found['n_labelled']} labelled images)"
        )
        majority = (summary.get("baselines") or {}).get("majority") or {}
        if "accuracy" in majority:
            print(
                f"majority-class baseline ({majority['class']}, from {majority['from']}): "
                f"accuracy {majority['accuracy']:.4f}, "
                f"balanced accuracy {majority['balanced_accuracy']:.4f}"
            )
    if summary.get("warning"):
        print(f"warning: {summary['warning']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imgpipe`` console script."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("imgpipe").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return predict_command(args)
    except DataError as err:
        print(f"imgpipe: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
