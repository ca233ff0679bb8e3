import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.demo import write_digits_tree  # noqa: E402
from imgpipe.logs import logged  # noqa: E402

with logged(snakemake.log[0]) as log:
    count = write_digits_tree(snakemake.params.tree, snakemake.output[0])
    log.info("wrote %d demo images to %s", count, snakemake.params.tree)
