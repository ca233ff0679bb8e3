import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

import cv2  # noqa: E402

from imgpipe.ingest import index_shard  # noqa: E402
from imgpipe.logs import logged  # noqa: E402
from imgpipe.scan import load_files  # noqa: E402


@contextlib.contextmanager
def c_stderr_to_log():
    """Point file descriptor 2 (where libpng/libjpeg/libtiff print) at the open log file.

    logged() redirects Python's streams only; the codecs write to the raw
    descriptor, and each bad file would otherwise print to the terminal.
    Sharing the log's open file (dup of its descriptor) keeps one file offset,
    so the two writers append to each other instead of overwriting.
    """
    sys.stdout.flush()
    saved = os.dup(2)
    try:
        os.dup2(sys.stdout.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 2)
        os.close(saved)


with logged(snakemake.log[0]) as log, c_stderr_to_log():
    # One job per core: the shards are the parallelism, not OpenCV's threads.
    cv2.setNumThreads(1)
    params = snakemake.params
    shard = int(snakemake.wildcards.shard)
    stats = index_shard(
        load_files(snakemake.input[0]),
        shard,
        params.shards,
        params.image,
        params.max_pixels,
        snakemake.output.stats,
        snakemake.output.images,
    )
    counts = stats["reason"].where(stats["status"] == "rejected").value_counts().to_dict()
    log.info("shard %d: %d kept, rejected %s", shard, int((stats["status"] == "ok").sum()), counts)
