rule augment:
    input:
        index="results/clean/index.csv",
        split="results/split/split.csv",
        arrays=shard_images,
    output:
        images="results/augment/images.npy",
        index="results/augment/index.csv",
        preview=report(
            "results/augment/preview.png",
            caption="../report/augment_preview.rst",
            category="Augmentation",
        ),
    log:
        "logs/augment.log",
    benchmark:
        "benchmarks/augment.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        augment=config["augment"],
        code=code("augment", "split", "dataset"),
    script:
        "../../scripts/augment.py"
