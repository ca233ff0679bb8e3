rule clean:
    input:
        stats=shard_stats,
        images=shard_images,
    output:
        index="results/clean/index.csv",
        rejected="results/clean/rejected.csv",
        summary="results/clean/summary.json",
        examples="results/clean/rejected_examples.png",
    params:
        clean={k: v for k, v in config["clean"].items() if k not in ("shards", "max_pixels")},
        code=code("clean", "dataset"),
    log:
        "logs/clean.log",
    benchmark:
        "benchmarks/clean.tsv"
    script:
        "../../scripts/clean.py"
