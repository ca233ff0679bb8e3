import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.cv import run_fold  # noqa: E402
from imgpipe.experiment import input_stamp, job_key, read_best  # noqa: E402
from imgpipe.logs import logged  # noqa: E402

with logged(snakemake.log[0]) as log:
    best = read_best(snakemake.input.get("best"))
    fold = int(snakemake.wildcards.fold)
    train_cfg = dict(snakemake.params.train)
    train_cfg["threads"] = train_cfg["threads"] or snakemake.threads
    key = job_key("cv", fold, snakemake.params.model, train_cfg, best, input_stamp(snakemake.input))
    run_fold(
        fold=fold,
        inputs=snakemake.input,
        model_cfg=snakemake.params.model,
        train_cfg=train_cfg,
        best=best,
        oof_path=snakemake.output.oof,
        summary_path=snakemake.output.summary,
        gpu_resource=snakemake.resources.gpu,
        key=key,
    )
