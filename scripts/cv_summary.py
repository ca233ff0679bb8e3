import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.cv import summarise_cv  # noqa: E402
from imgpipe.logs import logged  # noqa: E402

with logged(snakemake.log[0]):
    summarise_cv(
        index_path=snakemake.input.index,
        oof_paths=snakemake.input.folds,
        summary_paths=snakemake.input.fold_summaries,
        outputs=snakemake.output,
    )
