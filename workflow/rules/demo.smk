rule demo_data:
    output:
        directory(DEMO_ROOT),
    params:
        code=code("demo"),
    log:
        "logs/demo_data.log",
    benchmark:
        "benchmarks/demo_data.tsv"
    script:
        "../../scripts/demo_data.py"
