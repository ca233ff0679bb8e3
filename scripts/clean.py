import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.clean import CleanSettings, run_clean  # noqa: E402
from imgpipe.logs import logged  # noqa: E402

with logged(snakemake.log[0]) as log:
    settings = CleanSettings.from_config(snakemake.params.clean)
    result = run_clean(
        stats_paths=list(snakemake.input.stats),
        image_paths=list(snakemake.input.images),
        outputs={
            "index": snakemake.output.index,
            "rejected": snakemake.output.rejected,
            "summary": snakemake.output.summary,
            "examples": snakemake.output.examples,
        },
        settings=settings,
        examples_per_reason=snakemake.params.examples_per_reason,
    )
    log.info("clean: %s", result["total"])
    log.info("rejected per reason: %s", result["rejected_per_reason"])
    log.info("near duplicates: %s", result["near_duplicates"])
