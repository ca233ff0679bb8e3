# K-means on pixels or on the final model's embeddings. Only the embeddings
# job depends on the model, so retraining never reruns pixel clustering.


rule cluster:
    input:
        unpack(cluster_inputs),
    output:
        assignments="results/cluster/{features}/assignments.csv",
        metrics=report(
            "results/cluster/{features}/metrics.json",
            caption="../report/cluster_metrics.rst",
            category="Clustering",
            subcategory="{features}",
        ),
        contingency="results/cluster/{features}/contingency.csv",
        montage=report(
            "results/cluster/{features}/montage.png",
            caption="../report/cluster_montage.rst",
            category="Clustering",
            subcategory="{features}",
        ),
        scatter=report(
            "results/cluster/{features}/scatter.png",
            caption="../report/cluster_scatter.rst",
            category="Clustering",
            subcategory="{features}",
        ),
        k_scan="results/cluster/{features}/k_scan.csv",
        k_scan_png="results/cluster/{features}/k_scan.png",
        export=directory("results/cluster/{features}/export"),
    log:
        "logs/cluster/{features}.log",
    benchmark:
        "benchmarks/cluster/{features}.tsv"
    wildcard_constraints:
        features="pixels|embeddings",
    conda:
        "../../envs/train.yaml"
    threads: 4
    params:
        # "features" only picks which jobs run; it does not change any one job.
        settings={k: v for k, v in config["cluster"].items() if k != "features"},
        code=code("cluster"),
    script:
        "../../scripts/cluster.py"
