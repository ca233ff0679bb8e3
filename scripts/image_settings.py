import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.stages.ingest import run_image_settings  # noqa: E402
from imgpipe.workflow.stage_job import run_stage  # noqa: E402

run_stage(snakemake, run_image_settings)
