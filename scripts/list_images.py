import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from imgpipe.atomic import write_csv  # noqa: E402
from imgpipe.logs import logged  # noqa: E402
from imgpipe.scan import list_images  # noqa: E402

with logged(snakemake.log[0]) as log:
    params = snakemake.params
    files = list_images(params.root, params.extensions, params.test_root)
    write_csv(files, snakemake.output[0])
    counts = files.groupby(["source", "status"]).size().to_dict()
    log.info("listed %d files: %s", len(files), counts)
    for reason, count in files.loc[files["status"] == "rejected", "reason"].value_counts().items():
        log.info("listing rejected %d file(s) as %s", count, reason)
