import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))

from threadpoolctl import threadpool_limits  # noqa: E402

from imgpipe.cluster import run_clustering  # noqa: E402
from imgpipe.logs import logged  # noqa: E402

OUTPUTS = (
    "assignments",
    "metrics",
    "contingency",
    "montage",
    "scatter",
    "k_scan",
    "k_scan_png",
    "export",
)

with logged(snakemake.log[0]) as log:
    import faiss

    # Keep BLAS/OpenMP (scikit-learn, faiss) to the job's cores.
    faiss.omp_set_num_threads(snakemake.threads)
    with threadpool_limits(limits=snakemake.threads):
        run_clustering(
            snakemake.input.index,
            {name: getattr(snakemake.output, name) for name in OUTPUTS},
            snakemake.params.settings,
            snakemake.wildcards.features,
            model_path=snakemake.input.get("model"),
        )
