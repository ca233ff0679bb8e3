# Entry point of both rules in workflow/rules/report.smk: config_snapshot and report.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.logs import logged  # noqa: E402
from imgpipe.report import write_config_snapshot, write_report  # noqa: E402

with logged(snakemake.log[0]) as log:
    if snakemake.rule == "config_snapshot":
        write_config_snapshot(
            snakemake.params.config, snakemake.output[0], snakemake.params.configfiles
        )
        log.info("wrote the effective configuration to %s", snakemake.output[0])
    else:
        inputs = {name: str(path) for name, path in snakemake.input.items()}
        numbers = write_report(
            inputs, snakemake.output.html, snakemake.output.summary, snakemake.params.report
        )
        log.info("wrote %s and %s", snakemake.output.html, snakemake.output.summary)
        log.info("headline numbers: %s", numbers)
