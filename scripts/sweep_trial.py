import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.experiment import (  # noqa: E402
    input_stamp,
    job_key,
    load_training_data,
    run_training,
    write_json,
)
from imgpipe.logs import logged  # noqa: E402
from imgpipe.sweep import apply_overrides  # noqa: E402

with logged(snakemake.log[0]) as log:
    sections = apply_overrides(
        {"model": snakemake.params.model, "train": snakemake.params.train},
        snakemake.params.overrides,
    )
    sections["train"]["threads"] = sections["train"]["threads"] or snakemake.threads
    log.info("trial %s: %s", snakemake.wildcards.trial, snakemake.params.overrides)
    data = load_training_data(
        snakemake.input.index,
        snakemake.input.split,
        snakemake.input.aug_images,
        snakemake.input.aug_index,
    )
    out_dir = Path(snakemake.output.summary).parent
    key = job_key("sweep", sections, input_stamp(snakemake.input), str(out_dir))
    result = run_training(
        data,
        data.ids("train"),
        data.ids("val"),
        sections["model"],
        sections["train"],
        out_dir,
        snakemake.resources.gpu,
        key,
    )
    write_json(
        {**result, "trial": snakemake.wildcards.trial, "overrides": snakemake.params.overrides},
        snakemake.output.summary,
    )
