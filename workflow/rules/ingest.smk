rule list_images:
    input:
        listing_inputs,
    output:
        "results/ingest/files.csv",
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
        code=code("scan"),
    script:
        "../../scripts/list_images.py"


rule ingest_shard:
    input:
        "results/ingest/files.csv",
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
        shards=config["clean"]["shards"],
        max_pixels=config["clean"]["max_pixels"],
        image=config["image"],
        code=code("imageio", "imagestats", "ingest", "scan"),
    script:
        "../../scripts/ingest_shard.py"
