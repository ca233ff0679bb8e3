import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

import pandas as pd  # noqa: E402

from imgpipe.augment import pool_ids, stage_augment  # noqa: E402
from imgpipe.dataset import load_images, load_index  # noqa: E402
from imgpipe.errors import DataError  # noqa: E402
from imgpipe.logs import logged  # noqa: E402

with logged(snakemake.log[0]) as log:
    index = load_index(snakemake.input.index)
    roles = pd.read_csv(snakemake.input.split)
    ids = pool_ids(roles)
    pool = index.set_index("id").loc[ids].reset_index()
    if pool.empty:
        raise DataError("the split has no train or val image to augment")
    images = load_images(pool)
    log.info("augmenting %d training-pool images of shape %s", len(pool), images.shape[1:])
    out = {name: getattr(snakemake.output, name) for name in ("images", "index", "preview")}
    stage_augment(images, ids, snakemake.params.augment, out)
