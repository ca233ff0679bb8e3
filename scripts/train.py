import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.experiment import (  # noqa: E402
    input_stamp,
    job_key,
    load_training_data,
    read_best,
    run_training,
)
from imgpipe.logs import logged  # noqa: E402

# Guarded: should DDP have to fall back to spawned ranks (CUDA already in use),
# each rank re-imports this file and must not run the job again.
if __name__ == "__main__":
    with logged(snakemake.log[0]) as log:
        # Imported once logging goes to the log: Lightning only adds its own
        # stderr handler when the root logger has none.
        from imgpipe.training import apply_overrides

        best = read_best(snakemake.input.get("best"))
        model_cfg, train_cfg = apply_overrides(
            snakemake.params.model, snakemake.params.train, best.get("overrides", {})
        )
        train_cfg["threads"] = train_cfg["threads"] or snakemake.threads
        if best:
            log.info("sweep winner %s: %s", best.get("trial"), best.get("overrides"))
        data = load_training_data(
            snakemake.input.index,
            snakemake.input.split,
            snakemake.input.aug_images,
            snakemake.input.aug_index,
        )
        if best:
            # The sweep chose the settings and how many epochs they need: train on
            # the whole training pool (train + val) for that long, keep the last epoch.
            train_cfg["max_epochs"] = int(best["epochs"])
            train_ids, val_ids = data.ids("train", "val"), data.ids()
        else:
            train_ids, val_ids = data.ids("train"), data.ids("val")
        key = job_key("final", model_cfg, train_cfg, input_stamp(snakemake.input))
        summary = run_training(
            data,
            train_ids,
            val_ids,
            model_cfg,
            train_cfg,
            Path(snakemake.output.model).parent,
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
