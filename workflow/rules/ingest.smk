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
        follow_symlinks=config["data"]["follow_symlinks"],
        tree=tree_stamp(),
        code=code("list_images"),
    script:
        "../../scripts/list_images.py"


# image.size / image.mode: the configured values, or (auto) inferred from the
# headers of a sample of the listed files (imgpipe.data.image_settings).
rule image_settings:
    input:
        listing=rules.list_images.output.listing,
    output:
        settings=IMAGE_SETTINGS,
    log:
        "logs/ingest/image_settings.log",
    benchmark:
        "benchmarks/ingest/image_settings.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        image=IMAGE_CONFIG,
        code=code("image_settings"),
    script:
        "../../scripts/image_settings.py"


# Scatter: ingest.shards jobs each decode, measure and resize every
# ingest.shards-th file of the listing; clean gathers them.
rule ingest_shard:
    input:
        listing=rules.list_images.output.listing,
        image=rules.image_settings.output.settings,
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
        code=code("ingest_shard"),
    script:
        "../../scripts/ingest_shard.py"
