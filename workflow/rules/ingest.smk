rule list_images:
    input:
        unpack(listing_inputs),
    output:
        listing="results/ingest/files.csv",
    log:
        "logs/ingest/list_images.log",
    benchmark:
        "benchmarks/ingest/list_images.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        root=data_root(),
        test_root=config["data"]["test_root"],
        extensions=config["data"]["extensions"],
        tree=tree_stamp(),
        code=code("list_images"),
    script:
        "../../scripts/list_images.py"


# Scatter: ingest.shards jobs each decode, measure and resize every
# ingest.shards-th file of the listing; clean gathers them.
rule ingest_shard:
    input:
        listing=rules.list_images.output.listing,
    output:
        stats="results/ingest/shard-{shard}/stats.csv",
        images="results/ingest/shard-{shard}/images.npy",
    log:
        "logs/ingest/shard-{shard}.log",
    benchmark:
        "benchmarks/ingest/shard-{shard}.tsv"
    wildcard_constraints:
        shard=r"\d+",
    conda:
        "../../envs/data.yaml"
    params:
        shards=config["ingest"]["shards"],
        max_pixels=config["ingest"]["max_pixels"],
        image=config["image"],
        code=code("ingest_shard"),
    script:
        "../../scripts/ingest_shard.py"
