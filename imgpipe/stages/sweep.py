"""The sweep stages (rules sweep_trial, sweep_aggregate): one training per trial, then the ranking and the winning config."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from imgpipe.core.atomic import write_csv, write_json, write_yaml

# Through the module: the training seam tests replace (jobs.run_training).
from imgpipe.learn import jobs
from imgpipe.learn.sweep import best_config, collect_trials, plot_trials
from imgpipe.learn.training_run import (
    load_training_data,
)
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_sweep_trial(job: StageJob) -> dict:
    """One sweep trial: its overrides, trained on the train role over its schedule, scored on val."""
    overrides = job.params["overrides"]
    model_cfg, train_cfg = jobs.job_sections(job, overrides)
    train_cfg = jobs.sized_on_pool(train_cfg, job)
    trial = job.wildcards["trial"]
    log.info("trial %s: %s", trial, overrides)
    data = load_training_data(job.input)
    out_dir = Path(job.output["summary"]).parent
    key = jobs.resume_key("sweep", job, model_cfg, train_cfg, str(out_dir), name=f"sweep-{trial}")
    run = jobs.training_run(
        job, model_cfg, train_cfg, out_dir, key, jobs.tensorboard_dir_for("sweep", trial)
    )
    result = jobs.run_training(data, data.ids("train"), data.ids("val"), run, job)
    summary = {**result, "trial": trial, "overrides": overrides}
    write_json(summary, job.output["summary"])
    return summary


def run_sweep_aggregate(job: StageJob) -> dict[str, Any]:
    """The sweep_aggregate stage: every trial in trials.csv, the winner in best.yaml, a bar chart."""
    monitor = job.params["monitor"]
    summaries = [json.loads(Path(path).read_text(encoding="utf-8")) for path in job.input["trials"]]
    trials = collect_trials(summaries, monitor)
    write_csv(trials, job.output["trials"])
    best = best_config(trials, monitor)
    write_yaml(best, job.output["best"])
    plot_trials(trials, monitor, job.output["plot"])
    log.info("best trial %s: %s = %.4f", best["trial"], monitor, best["score"])
    return best
