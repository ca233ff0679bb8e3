rule clean:
    input:
        stats=shard_stats,
        images=shard_images,
    output:
        index="results/clean/index.csv",
        rejected="results/clean/rejected.csv",
        summary=report(
            "results/clean/summary.json",
            caption="../report/clean_summary.rst",
            category="Data",
        ),
        examples=report(
            "results/clean/rejected_examples.png",
            caption="../report/rejected_examples.rst",
            category="Data",
        ),
    log:
        "logs/clean.log",
    benchmark:
        "benchmarks/clean.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        # Only the decision keys: shards and max_pixels act at ingest.
        clean={
            k: v
            for k, v in config["clean"].items()
            if k not in ("shards", "max_pixels")
        },
        examples_per_reason=8,
        code=code("clean", "dataset"),
    script:
        "../../scripts/clean.py"
