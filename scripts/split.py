import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.dataset import load_index  # noqa: E402
from imgpipe.logs import logged  # noqa: E402
from imgpipe.split import assign_roles, check_test_source, write_split  # noqa: E402

with logged(snakemake.log[0]) as log:
    index = load_index(snakemake.input.index)
    check_test_source(index, snakemake.params.test_root)
    cfg = snakemake.params.split
    roles = assign_roles(index, cfg["test_fraction"], cfg["val_fraction"], cfg["seed"])
    write_split(roles, snakemake.output.split)
    log.info("wrote %d roles to %s", len(roles), snakemake.output.split)
