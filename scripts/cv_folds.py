import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

import pandas as pd  # noqa: E402

from imgpipe.cv import assign_folds  # noqa: E402
from imgpipe.dataset import load_index  # noqa: E402
from imgpipe.experiment import write_csv  # noqa: E402
from imgpipe.logs import logged  # noqa: E402

with logged(snakemake.log[0]) as log:
    index = load_index(snakemake.input.index)
    split = pd.read_csv(snakemake.input.split)
    pool_ids = split.loc[split["role"].isin(["train", "val"]), "id"]
    pool = index.set_index("id").loc[pool_ids].reset_index()
    cv = snakemake.params.cv
    folds = assign_folds(pool, cv["k"], cv["adapt_k"], snakemake.params.seed)
    log.info(
        "%d images in %d folds: %s",
        len(folds),
        folds["fold"].nunique(),
        folds["fold"].value_counts().sort_index().to_dict(),
    )
    write_csv(folds, snakemake.output[0])
