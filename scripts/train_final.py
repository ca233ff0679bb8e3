import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.stages.train import run_train_final  # noqa: E402
from imgpipe.workflow.stage_job import run_stage  # noqa: E402

# Guarded: should DDP have to fall back to spawned ranks (CUDA already in use),
# each rank re-imports this file and must not run the job again.
if __name__ == "__main__":
    run_stage(snakemake, run_train_final)
