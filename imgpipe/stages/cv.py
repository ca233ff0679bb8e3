"""The cross-validation stages (rules cv_assign, cv_fold, cv_summary): folds, one training per fold, their summary."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from imgpipe.core.atomic import read_csv, write_csv, write_json
from imgpipe.data.split import load_split

# Through the module: the training seam tests replace (jobs.run_training).
from imgpipe.learn import jobs
from imgpipe.learn.cv import assign_folds, summarise_cv
from imgpipe.learn.training_run import (
    load_training_data,
)
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_cv_assign(job: StageJob) -> pd.DataFrame:
    """The cv_assign stage: a fold for every image of the training pool (folds.csv)."""
    from imgpipe.data.dataset import load_index
    from imgpipe.data.split import training_pool

    pool = training_pool(load_index(job.input["index"]), load_split(job.input["split"]))
    cv = job.params["cv"]
    folds = assign_folds(pool, cv["k"], cv["adapt_k"], job.params["seed"])
    log.info(
        "%d images in %d folds: %s",
        len(folds),
        folds["fold"].nunique(),
        folds["fold"].value_counts().sort_index().to_dict(),
    )
    write_csv(folds, job.output["folds"])
    return folds


def run_cv_summary(job: StageJob) -> pd.DataFrame:
    """The cv_summary stage: gather the folds into summary.csv, oof.csv and the suspect labels."""
    return summarise_cv(
        job.input["index"], job.input["folds"], job.input["fold_summaries"], job.output
    )


def run_cv_fold(job: StageJob) -> dict:
    """Train on every fold but this one with the final model's recipe, then predict this one.

    The held-out fold never influences its model. Like the final model, the
    fold runs the whole schedule and keeps its last epoch: with a sweep, the
    winner's settings on all of the fold's training images (no validation);
    without one, on the fold's training images less an inner validation split
    (as the final model trains on the train role and validates on val; the
    inner split is only scored). Its out-of-fold
    probabilities go to cleanlab. A fold at or beyond the number of folds
    actually used (``cv.adapt_k`` lowered k) writes an empty table and a
    summary marked ``skipped``; the fold's model and history (written beside
    them) are not declared outputs for that reason.
    """
    from imgpipe.data.dataset import class_names
    from imgpipe.infer.inference import predict_logits
    from imgpipe.learn.baselines import both_baselines
    from imgpipe.learn.calibration import calibrated_probabilities, calibration_summary
    from imgpipe.learn.cv import fold_metrics, folds_used

    fold = int(job.wildcards["fold"])
    oof_path, summary_path = job.output["oof"], job.output["summary"]
    folds = read_csv(job.input["folds"])
    if fold >= folds_used(folds):
        log.info("fold %d skipped: only %d folds are used", fold, folds_used(folds))
        write_csv(pd.DataFrame(columns=["id", "fold", "label"]), oof_path)
        if "history" in job.output:  # a declared output: an empty training history
            write_csv(pd.DataFrame(columns=["epoch", "step", "train_loss"]), job.output["history"])
        write_json({"fold": fold, "skipped": True}, summary_path)
        return {"skipped": True}
    best = jobs.read_best(job.input.get("best"))
    model_cfg, train_cfg = jobs.job_sections(job, best.get("overrides", {}))
    train_cfg = jobs.sized_on_pool(train_cfg, job)
    data = load_training_data(job.input)
    held_out = np.sort(folds.loc[folds["fold"] == fold, "id"].to_numpy())
    # Fold -1: images of classes that are one single group; they always train.
    fold_train = np.sort(folds.loc[folds["fold"] != fold, "id"].to_numpy())
    if best:
        train_ids, val_ids = fold_train, np.zeros(0, np.int64)
    else:
        val_ids = np.sort(jobs.fold_validation(data, fold_train, job))
        train_ids = np.setdiff1d(fold_train, val_ids)
    log.info(
        "fold %d: training on %d, validating on %d (%s), scoring %d held-out images",
        fold,
        len(train_ids),
        len(val_ids),
        "none: the sweep winner's recipe" if best else "an inner split of the fold's training part",
        len(held_out),
    )
    out_dir = Path(summary_path).parent
    key = jobs.resume_key("cv", job, fold, model_cfg, train_cfg, best, name=f"cv-fold-{fold}")
    run = jobs.training_run(
        job,
        model_cfg,
        train_cfg,
        out_dir,
        key,
        jobs.tensorboard_dir_for("cv", f"fold-{fold}"),
        best,
    )
    result = jobs.run_training(data, train_ids, val_ids, run, job)
    # The fold's model was built from this config's model.name: its factory, if any, is trusted.
    logits = predict_logits(
        out_dir / "model.ckpt", data.images, ids=held_out, model_factory=model_cfg["name"]
    )
    # Calibrated like the final model (imgpipe.learn.calibration): ECE / NLL before and after on the
    # held-out fold go to summary.csv.
    temperature = result.get("temperature", 1.0)
    calibration = calibration_summary(
        logits, data.labels[held_out], temperature, result.get("temperature_fitted_on", "none")
    )
    calibration.pop("reliability")
    probs = calibrated_probabilities(logits, temperature)
    oof = pd.DataFrame(probs, columns=[f"p{c}" for c in range(probs.shape[1])])
    oof.insert(0, "label", data.labels[held_out])
    oof.insert(0, "fold", fold)
    oof.insert(0, "id", held_out)
    write_csv(oof, oof_path)
    metrics = fold_metrics(data.labels[held_out], probs.argmax(axis=1))
    # The reference points on the same images: fitted on what the fold's model
    # trained on, scored on its held-out images (imgpipe.learn.baselines).
    baselines = both_baselines(
        data.images, data.labels, train_ids, held_out, class_names(data.index)
    )
    summary = {
        **result,
        **metrics,
        "fold": fold,
        "n_train": len(train_ids),
        "n_inner_val": len(val_ids),
        "n_held_out": len(held_out),
        "baselines": baselines,
        "calibration": calibration,
    }
    write_json(summary, summary_path)
    return summary
