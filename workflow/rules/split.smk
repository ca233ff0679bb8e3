rule split:
    input:
        index=rules.clean.output.index,
    output:
        split="results/split/split.csv",
    log:
        "logs/split.log",
    benchmark:
        "benchmarks/split.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        split=config["split"],
        test_root=bool(config["data"]["test_root"]),
        code=code("split"),
    script:
        "../../scripts/split.py"
