import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.experiment import (  # noqa: E402
    input_stamp,
    job_key,
    load_training_data,
    read_best,
    resume_dir_for,
    run_training,
)
from imgpipe.launch import launch_ranks, make_job, should_launch  # noqa: E402
from imgpipe.logs import logged  # noqa: E402

# Guarded: should DDP have to fall back to spawned ranks (CUDA already in use),
# each rank re-imports this file and must not run the job again.
if __name__ == "__main__":
    with logged(snakemake.log[0]) as log:
        # Imported once logging goes to the log: Lightning only adds its own
        # stderr handler when the root logger has none.
        from imgpipe.sweep import apply_overrides

        best = read_best(snakemake.input.get("best"))
        sections = apply_overrides(
            {"model": snakemake.params.model, "train": snakemake.params.train},
            best.get("overrides", {}),
        )
        model_cfg, train_cfg = sections["model"], sections["train"]
        train_cfg["threads"] = train_cfg["threads"] or snakemake.threads
        if best:
            log.info("sweep winner %s: %s", best.get("trial"), best.get("overrides"))
            # The sweep chose the settings and how many epochs they need: train on
            # the whole training pool (train + val) for that long, keep the last epoch.
            train_cfg["max_epochs"] = int(best["epochs"])
            train_roles, val_roles = ["train", "val"], []
        else:
            train_roles, val_roles = ["train"], ["val"]
        nodes, gpus = train_cfg["num_nodes"], train_cfg["gpus_per_node"]
        out_dir = Path(snakemake.output.model).parent
        if should_launch(nodes, gpus):
            # A SLURM job of nodes x gpus tasks: srun starts one rank per GPU (imgpipe.launch).
            cpus = snakemake.resources.get("cpus_per_gpu")
            if isinstance(cpus, int) and cpus > 0:
                train_cfg["threads"] = cpus  # each rank's share of the job's CPUs
            key = job_key("final", model_cfg, train_cfg, input_stamp(snakemake.input))
            inputs = {
                name: snakemake.input[name]
                for name in ("index", "split", "aug_images", "aug_index")
            }
            job = make_job(
                inputs, train_roles, val_roles, model_cfg, train_cfg, out_dir, resume_dir_for(key)
            )
            summary = launch_ranks(job, cpus_per_task=cpus or None, stdout=sys.stdout)
        else:
            if nodes > 1:
                log.warning(
                    "train.num_nodes is %d but this is no SLURM job: training on this "
                    "machine only (one node)",
                    nodes,
                )
            train_cfg["num_nodes"] = 1
            data = load_training_data(
                snakemake.input.index,
                snakemake.input.split,
                snakemake.input.aug_images,
                snakemake.input.aug_index,
            )
            key = job_key("final", model_cfg, train_cfg, input_stamp(snakemake.input))
            summary = run_training(
                data,
                data.ids(*train_roles),
                data.ids(*val_roles),
                model_cfg,
                train_cfg,
                out_dir,
                snakemake.resources.gpu,
                key,
            )
        log.info(
            "final model: epoch %d of %d, %.0f images/s on %d %s device(s)",
            summary["best_epoch"],
            summary["epochs"],
            summary["images_per_s"] or 0,
            summary["world_size"],
            summary["accelerator"],
        )
