"""Predict new image files with a trained model: the ``predict`` stage and ``imgpipe predict``.

``predict_files`` predicts a folder or a CSV manifest. Each file goes through
the pipeline's own checks (the listing's refusals, the decoder's, clean's
quality checks with the settings the model was trained with) and its one
preprocessing path (``imgpipe.data.ingest.prepare_images``), decoded by a pool of
threads; batches stream through the model into the predictions file (CSV, JSON
or Parquet: ``imgpipe.infer.output``), so memory follows the batch size, not
the number of files.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import itertools
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.core.errors import DataError
from imgpipe.infer.inference import Model, load_model, scores_from_logits
from imgpipe.infer.modelfile import QUALITY_KEYS
from imgpipe.infer.output import output_format as output_format_of
from imgpipe.infer.output import score
from imgpipe.workflow.settings import filled
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")

# Default number of classes per row (``--topk``, ``predict.topk``), capped at the class count.
TOP_K = 5
# The score column of each output type (prob: softmax of the logits; logit: the logits).
SCORE_COLUMN = {"prob": "probability", "logit": "logit"}
# Most files screened together by one worker (a chunk's quality checks run on it at once).
SCREEN_CHUNK = 256
# Batches of decoded images a predict may hold ahead of the model: memory follows the batch.
BATCHES_IN_FLIGHT = 2
# Images per row of the montage of the most and the least confident predictions.
MONTAGE_PER_ROW = 8


def prediction_columns(k: int, output_type: str = "prob") -> list[str]:
    """The output's columns for ``k`` classes per row: label, probability (or logit), label_2, ..."""
    name = SCORE_COLUMN[output_type]
    ranked = [
        column
        for rank in range(1, k + 1)
        for column in (("label", name) if rank == 1 else (f"label_{rank}", f"{name}_{rank}"))
    ]
    return ["path", "relpath", *ranked, "rejected", "detail", "given_label"]


def clean_settings_metadata(clean_section: Mapping[str, Any]) -> dict[str, Any]:
    """The quality-check settings of a ``clean:`` section that prediction applies (defaults filled in)."""
    # A model file written before a key existed lacks it: the schema's default fills it.
    filled_section = filled("clean", {k: v for k, v in clean_section.items() if k in QUALITY_KEYS})
    return {key: filled_section[key] for key in QUALITY_KEYS}


def list_inputs(
    source: str | os.PathLike,
    extensions: Sequence[str],
    class_names: Sequence[str] = (),
    follow_symlinks: bool = False,
) -> tuple[pd.DataFrame, bool]:
    """The files to predict (``imgpipe.data.listing`` columns) and whether ``source`` carries labels.

    ``source`` is a folder (any layout: images in the root, in class folders,
    nested) or a CSV manifest with columns ``path,label`` (labels may be empty).
    The listing's refusals apply (hidden, unsupported extension, broken symlink,
    missing file, a symlink leading outside ``source`` unless ``follow_symlinks``,
    ...); an image outside any class folder, or with an empty
    label, is simply unlabelled. The input is *labelled* when every image
    candidate has a label and at least one label is a class of the model: a
    ``<class>/<image>`` tree or a labelled manifest.
    """
    from imgpipe.data.listing import COLUMNS, _manifest_file_problem, list_source

    rows = list_source(source, extensions, "predict", follow_symlinks)
    table = pd.DataFrame(rows, columns=COLUMNS, dtype=str)
    unlabelled = np.flatnonzero((table["reason"] == "no_class").to_numpy())
    if len(unlabelled):
        # The listing stops at "no class" before its file checks: run them here.
        problems = [_manifest_file_problem(p) for p in table["path"].to_numpy()[unlabelled]]
        columns = {c: table[c].to_numpy(dtype=object, copy=True) for c in COLUMNS[2:]}
        columns["label"][unlabelled] = ""
        columns["status"][unlabelled] = ["rejected" if p else "ok" for p in problems]
        columns["reason"][unlabelled] = [p[0] if p else "" for p in problems]
        columns["detail"][unlabelled] = [p[1] if p else "" for p in problems]
        for name, values in columns.items():
            table[name] = values
    table = table.sort_values("relpath", kind="stable", ignore_index=True)
    candidates = table["status"] == "ok"
    labels = table.loc[candidates, "label"]
    labelled = bool(
        candidates.any() and (labels != "").all() and labels.isin(list(class_names)).any()
    )
    return table, labelled


# ----------------------------------------------------------------------------- screening


@dataclass(slots=True)
class Screened:
    """One listed file: the model-ready array, or why it is refused (listing, decoding, quality)."""

    row: int
    reason: str = ""
    detail: str = ""
    array: np.ndarray | None = None


def screen(
    files: pd.DataFrame, model: Model, workers: int = 0, batch_size: int = 256
) -> Iterator[Screened]:
    """Every row of ``files`` in order with its uint8 array, or its reason for refusal.

    The listing's refusals pass through unopened; the others go through
    ``imgpipe.data.ingest.prepare_images`` (decoding and resizing exactly as ingest
    did for the training images) and clean's per-image quality checks with the
    model's clean settings, a chunk of files at a time. ``workers`` > 0 screens
    chunks on that many threads (OpenCV releases the GIL while it decodes and
    resizes) and hands them back in order; at most ``BATCHES_IN_FLIGHT``
    batches of ``batch_size`` files are decoded ahead of the consumer, so memory
    follows the batch size whatever the number of files.
    """
    from imgpipe.images.quality import CleanSettings

    # The quality keys the model file records, the rest of the section from the schema.
    settings = CleanSettings.from_config(filled("clean", clean_settings_metadata(model.clean)))
    columns = {c: files[c].tolist() for c in ("path", "status", "reason", "detail")}
    chunk = chunk_size(batch_size, workers)
    chunks = (range(s, min(s + chunk, len(files))) for s in range(0, len(files), chunk))
    screen_one = functools.partial(_screen_chunk, columns=columns, model=model, settings=settings)
    if workers <= 0:
        for rows in chunks:
            yield from screen_one(rows)
        return
    limit = max(workers, BATCHES_IN_FLIGHT * math.ceil(batch_size / chunk))
    with ThreadPoolExecutor(workers, thread_name_prefix="imgpipe-decode") as pool:
        pending: collections.deque = collections.deque()
        try:
            for rows in chunks:
                if len(pending) >= limit:
                    yield from pending.popleft().result()
                pending.append(pool.submit(screen_one, rows))
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:  # the consumer stopped early: drop what is queued
                future.cancel()


def chunk_size(batch_size: int, workers: int) -> int:
    """Files per screening chunk: a batch shared among the workers (at most ``SCREEN_CHUNK``)."""
    return max(1, min(SCREEN_CHUNK, math.ceil(batch_size / max(1, workers))))


def _screen_chunk(
    rows: range, columns: Mapping[str, list], model: Model, settings: Any
) -> list[Screened]:
    """Screen ``rows``: decode and resize the listed files, run the quality checks."""
    from imgpipe.data.ingest import PREPARED_COLUMNS, prepare_images
    from imgpipe.images.quality import quality_reasons

    statuses, reasons, details, paths = (columns[c] for c in ("status", "reason", "detail", "path"))
    opened = [row for row in rows if statuses[row] == "ok"]
    # No identity hashes: prediction runs the quality checks, not the duplicate checks.
    files = (paths[r] for r in opened)
    prepared = list(prepare_images(files, model.image, model.max_pixels, hashes=False))
    decoded = {row: item for row, item in zip(opened, prepared, strict=True)}
    quality: dict[int, tuple[str, str]] = {}
    measured = [row for row in opened if decoded[row][1] is not None]
    if measured:
        stats = pd.DataFrame([decoded[r][0] for r in measured], columns=PREPARED_COLUMNS)
        found, found_detail = quality_reasons(stats, settings)
        quality = dict(zip(measured, zip(found, found_detail, strict=True), strict=True))
    screened = []
    for row in rows:
        if statuses[row] != "ok":
            screened.append(Screened(row, reasons[row] or "unreadable", details[row]))
            continue
        fields, array = decoded[row]
        if array is None:
            status = dict(zip(PREPARED_COLUMNS, fields, strict=True))
            screened.append(Screened(row, status["reason"] or "unreadable", status["detail"] or ""))
        elif quality[row][0]:
            screened.append(Screened(row, *quality[row]))
        else:
            screened.append(Screened(row, array=array))
    return screened


# ----------------------------------------------------------------------------- predicting files


# Characters of a file name in a montage caption (a 96 px cell holds about 18
# at the captions' font size); longer names keep their start and end.
CAPTION_NAME_WIDTH = 18
MONTAGE_TILE = 96
ELLIPSIS = "\u2026"


def shorten_middle(text: str, width: int = CAPTION_NAME_WIDTH) -> str:
    """``text`` in at most ``width`` characters: its start and end around a middle ellipsis."""
    if width < 1:
        raise ValueError(f"width {width}: expected at least 1")
    if len(text) <= width:
        return text
    kept = width - 1
    head = (kept + 1) // 2  # the start gets the odd character: names differ there more often
    tail = kept - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


def montage_caption(relpath: str, label: str, probability: float, given: str = "") -> str:
    """A montage cell's caption: the file name (shortened), then its top label and probability.

    The given label follows in brackets where it differs from the prediction.
    A file name that is not UTF-8 shows its odd bytes as ``\\xNN``.
    """
    name = os.fsencode(relpath).decode("utf-8", "backslashreplace")
    line = f"{label} {probability:.2f}"
    if given and given != label:
        line += f" [{given}]"
    return f"{shorten_middle(name)}\n{line}"


class _Montage:
    """The most and the least confident predictions seen so far (a bounded pair of heaps)."""

    def __init__(self, per_row: int = MONTAGE_PER_ROW) -> None:
        self.per_row = per_row
        self.most: list[tuple] = []
        self.least: list[tuple] = []
        self.counter = itertools.count()

    def add(self, confidence: float, array: np.ndarray, caption: str) -> None:
        """Offer one prediction to both heaps."""
        n = next(self.counter)
        for heap, key in ((self.most, confidence), (self.least, -confidence)):
            item = (key, -n, array, caption)
            if len(heap) < self.per_row:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

    def write(self, path: str | os.PathLike) -> None:
        """Write the two rows (most confident first, then least confident) as one PNG grid."""
        from imgpipe.core.plots import image_grid

        rows, titles, captions = [], [], []
        for name, heap in (("most confident", self.most), ("least confident", self.least)):
            if heap:
                ordered = sorted(heap, reverse=True)
                rows.append([item[2] for item in ordered])
                captions.append([item[3] for item in ordered])
                titles.append(name)
        image_grid(
            rows,
            path,
            row_titles=titles,
            cell_titles=captions,
            title="predictions: most and least confident",
            empty_text="no image was predicted",
            tile=MONTAGE_TILE,
        )


def predict_files(
    model: Model,
    source: str | os.PathLike,
    output: str | os.PathLike,
    batch_size: int = 256,
    montage: str | os.PathLike | None = None,
    metrics: str | os.PathLike | None = None,
    extensions: Sequence[str] | None = None,
    follow_symlinks: bool = False,
    topk: int = TOP_K,
    output_type: str = "prob",
    output_format: str | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Predict every file of a folder or manifest into ``output``; return the summary.

    One row per listed file in ``relpath`` order: ``label`` / ``probability``
    (the top class), ``label_2`` / ``probability_2`` ... up to ``topk`` classes
    (capped at the class count), ``rejected`` (the reason a file was not
    predicted: a listing, decoding or quality refusal) with its ``detail``, and
    ``given_label`` (the file's class when the input is labelled).
    ``output_type`` ``logit`` writes ``logit`` columns (the model's logits)
    instead of probabilities. ``output_format``: csv, json or parquet (default:
    by the output's suffix, see ``imgpipe.infer.output``). Files are screened
    by ``workers`` decoding threads (0: this thread) and predicted
    ``batch_size`` images at a time, rows appended as they come: memory follows
    the batch, not the input; a progress line (files, rate, time left) is
    logged every few seconds. ``montage``: PNG of the most and least confident
    images. ``metrics``: JSON of the counts, and for a labelled input the
    accuracy, macro F1 and per-class table over the images whose label is a
    class of the model. ``follow_symlinks``: read symlinks whose target lies
    outside ``source`` (else refused as ``outside_root``). The input is only read.
    """
    from imgpipe.core.atomic import write_json
    from imgpipe.core.logs import Progress
    from imgpipe.infer.output import check_writable, open_rows

    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if topk < 1:
        raise DataError(f"topk must be at least 1, got {topk}")
    if workers < 0:
        raise DataError(f"workers must be 0 (decode in this thread) or more, got {workers}")
    if output_type not in SCORE_COLUMN:
        raise DataError(f"output type {output_type!r}: expected one of {', '.join(SCORE_COLUMN)}")
    fmt = output_format_of(output, output_format)
    check_writable(fmt)
    names = model.class_names
    files, labelled = list_inputs(source, extensions or model.extensions, names, follow_symlinks)
    code_of = {name: code for code, name in enumerate(names)}
    k = min(topk, len(names))
    counts: Counter = Counter()
    y_true: list[np.ndarray] = []
    y_pred: list[np.ndarray] = []
    unknown_labels: Counter = Counter()
    gallery = _Montage()
    paths, relpaths = files["path"].tolist(), files["relpath"].tolist()
    given = files["label"].tolist() if labelled else [""] * len(files)
    log.info(
        "predicting %d listed file(s) of %s with %s (%s, %s, %d decoding worker(s)); %s input",
        len(files),
        source,
        model.path,
        model.kind,
        model.device,
        workers,
        "labelled" if labelled else "unlabelled",
    )
    progress = Progress(len(files), "predict", unit="files")

    def flush(pending: list[Screened], writer: Any) -> None:
        batch = [item for item in pending if item.array is not None]
        if batch:
            logits = model.logits(np.stack([item.array for item in batch]))
            probs = scores_from_logits(logits, "prob")
            written = probs if output_type == "prob" else scores_from_logits(logits, "logit")
            order = np.argsort(-written, axis=1, kind="stable")[:, :k]
        predicted = iter(range(len(batch)))
        codes_true, codes_pred = [], []
        rows: list[list[Any]] = []
        for item in pending:
            row = [paths[item.row], relpaths[item.row]]
            if item.array is None:
                counts[item.reason] += 1
                rows.append([*row, *[None] * (2 * k), item.reason, item.detail, given[item.row]])
                continue
            j = next(predicted)
            cells = [v for c in order[j] for v in (names[c], score(written[j, c]))]
            rows.append([*row, *cells, None, None, given[item.row] or None])
            counts["predicted"] += 1
            top, confidence = names[order[j, 0]], float(probs[j, order[j, 0]])
            caption = montage_caption(relpaths[item.row], top, confidence, given[item.row])
            gallery.add(confidence, item.array, caption)
            if labelled:
                if given[item.row] in code_of:
                    codes_true.append(code_of[given[item.row]])
                    codes_pred.append(int(order[j, 0]))
                else:
                    unknown_labels[given[item.row]] += 1
        writer.write([[None if v == "" else v for v in r] for r in rows])
        progress.advance(len(pending))
        if codes_true:
            y_true.append(np.asarray(codes_true, np.int32))
            y_pred.append(np.asarray(codes_pred, np.int32))

    with open_rows(output, fmt, prediction_columns(k, output_type)) as writer:
        pending: list[Screened] = []
        images = 0
        for item in screen(files, model, workers, batch_size):
            pending.append(item)
            images += item.array is not None
            if images >= batch_size:
                flush(pending, writer)
                pending, images = [], 0
        flush(pending, writer)
    progress.finish()
    summary: dict[str, Any] = {
        "input": os.fspath(source),
        "model": model.path,
        "runtime": model.kind,
        "device": model.device,
        "output": {"path": os.fspath(output), "format": fmt, "output_type": output_type, "topk": k},
        "files": len(files),
        "predicted": counts.pop("predicted", 0),
        "rejected": dict(sorted(counts.items())),
        "labelled": labelled,
        "class_names": names,
    }
    if labelled:
        from imgpipe.learn.metrics import classification_metrics

        truth = np.concatenate(y_true) if y_true else np.zeros(0, np.int32)
        guess = np.concatenate(y_pred) if y_pred else np.zeros(0, np.int32)
        scores = classification_metrics(truth, guess, names)
        summary["metrics"] = {"n_labelled": scores.pop("n"), **scores}
        summary["labels_not_in_model"] = dict(sorted(unknown_labels.items()))
        add_baselines(summary, truth, model.metadata)
    if metrics is not None:
        write_json(summary, metrics)
    if montage is not None:
        gallery.write(montage)
    log.info(
        "%d predicted, %d rejected %s",
        summary["predicted"],
        sum(summary["rejected"].values()),
        summary["rejected"],
    )
    return summary


def rule_factories(job: StageJob) -> tuple[str, ...]:
    """The factories the predict rule trusts: ``predict.model_factory`` and those the config trains with.

    Both come from the user's config, never from the model file.
    """
    from imgpipe.infer.modelfile import configured_factories, factory_names

    named = factory_names(job.params["settings"].get("model_factory"))
    return tuple(dict.fromkeys((*named, *configured_factories(job.config))))


def add_baselines(summary: dict[str, Any], truth: np.ndarray, metadata: Mapping) -> None:
    """Add ``baselines`` (and ``warning`` when the model does not beat them) to a labelled summary."""
    from imgpipe.learn.baseline_warning import warning_line
    from imgpipe.learn.baselines import labelled_input_baselines

    summary["baselines"] = labelled_input_baselines(truth, summary["class_names"], metadata)
    line = warning_line(summary["metrics"], summary["baselines"])
    if line:
        summary["warning"] = line


def run_predict(job: StageJob) -> dict[str, Any]:
    """The predict stage: the final model on ``predict.input`` into results/predict/<name>/."""
    import torch

    from imgpipe.learn.gpus import claim_for_inference

    # The predict section (its defaults filled in at start-up, or here for a partial one).
    settings = filled("predict", job.params["settings"])
    torch.set_num_threads(max(1, int(job.threads)))
    # null: decode on as many threads as the rule has.
    workers = settings["workers"]
    workers = int(job.threads) if workers is None else int(workers)
    # A device the config names is used as named; otherwise one GPU is claimed when there are.
    named = settings["device"]
    claim = contextlib.nullcontext(named) if named else claim_for_inference()
    with claim as device:
        model = load_model(job.input["model"], device=device, model_factory=rule_factories(job))
        summary = predict_files(
            model,
            settings["input"],
            job.output["predictions"],
            batch_size=int(settings["batch_size"]),
            montage=job.output["montage"],
            metrics=job.output["metrics"],
            follow_symlinks=bool(settings["follow_symlinks"]),
            topk=int(settings["topk"]),
            output_type=settings["output_type"],
            output_format=settings["format"],
            workers=workers,
        )
    if summary.get("metrics"):
        found = summary["metrics"]
        log.info(
            "labelled input: accuracy %.4f, macro F1 %.4f over %d images",
            found["accuracy"],
            found["f1_macro"],
            found["n_labelled"],
        )
    if summary.get("warning"):
        from imgpipe.core.logs import TERMINAL

        log.warning("%s", summary["warning"], extra={TERMINAL: True})
    return summary
