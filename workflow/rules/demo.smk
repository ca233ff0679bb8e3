# The demo tree is written whole (into a temporary folder renamed into place);
# its declared output is the list of files written, so Snakemake's directory
# marker never lands inside the tree the listing then reads like a user's.
rule demo_data:
    output:
        listing=DEMO_LIST,
    log:
        "logs/demo_data.log",
    benchmark:
        "benchmarks/demo_data.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        tree=lambda wildcards, output: os.path.splitext(output.listing)[0],
        code=code("demo_data"),
    script:
        "../../scripts/demo_data.py"
