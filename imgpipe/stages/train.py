"""The final model's stage (rule train_final): the winning recipe trained on the whole training pool."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from imgpipe.data.split import final_roles

# Through the module: the training seam tests replace (jobs.run_training).
from imgpipe.learn import jobs
from imgpipe.learn.training_run import (
    load_training_data,
)
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


def run_train_final(job: StageJob) -> dict:
    """The final model: with a sweep, the winner's recipe on the whole training pool; else train / val.

    With ``train.num_nodes`` x ``train.gpus_per_node`` > 1 inside a SLURM job
    it writes the job file and starts one rank per GPU with srun
    (imgpipe.learn.launch); anywhere else it trains on this machine.
    """
    from imgpipe.learn.launch import launch_ranks, make_job, should_launch

    best = jobs.read_best(job.input.get("best"))
    model_cfg, train_cfg = jobs.job_sections(job, best.get("overrides", {}))
    train_cfg = jobs.sized_on_pool(train_cfg, job)
    # After a sweep (it chose the settings): the whole training pool (train + val), the
    # winner's whole schedule (the one it was scored at the end of), no validation.
    train_roles, val_roles = final_roles(bool(best))
    if best:
        log.info("sweep winner %s: %s", best.get("trial"), best.get("overrides"))
    nodes, gpus = train_cfg["num_nodes"], train_cfg["gpus_per_node"]
    out_dir = Path(job.output["model"]).parent
    key = jobs.resume_key("final", job, model_cfg, train_cfg)
    launching = should_launch(nodes, gpus)
    cpus = job.resources.get("cpus_per_gpu")
    if launching and isinstance(cpus, int) and cpus > 0:
        train_cfg["threads"] = cpus  # each rank's share of the job's CPUs
    if not launching:
        if nodes > 1:
            log.warning(
                "train.num_nodes is %d but this is no SLURM job: training on this "
                "machine only (one node)",
                nodes,
            )
        train_cfg["num_nodes"] = 1
    # The one description of this run, for the srun ranks and the local fit alike.
    run = jobs.training_run(
        job, model_cfg, train_cfg, out_dir, key, jobs.tensorboard_dir_for("final", "final"), best
    )
    if launching:
        # A SLURM job of nodes x gpus tasks: srun starts one rank per GPU (imgpipe.learn.launch).
        launch = make_job(jobs.data_inputs(job.input), train_roles, val_roles, run)
        summary = launch_ranks(launch, cpus_per_task=cpus or None, stdout=sys.stdout)
    else:
        data = load_training_data(job.input)
        summary = jobs.run_training(data, data.ids(*train_roles), data.ids(*val_roles), run, job)
    jobs.record_test_metrics(job, out_dir / "model.ckpt", model_cfg["name"])
    log.info(
        "final model: %d epochs, %d steps of batch %d, %.0f images/s on %d %s device(s)",
        summary["epochs"],
        summary["steps"],
        summary["batch_size"],
        summary["images_per_s"] or 0,
        summary["world_size"],
        summary["accelerator"],
    )
    return summary
