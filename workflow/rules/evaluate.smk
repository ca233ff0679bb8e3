rule evaluate:
    input:
        index="results/clean/index.csv",
        split="results/split/split.csv",
        arrays=shard_images,
        model="results/train/final/model.ckpt",
        history="results/train/final/history.csv",
    output:
        metrics="results/evaluate/metrics.json",
        confusion="results/evaluate/confusion.csv",
        confusion_png="results/evaluate/confusion.png",
        per_class="results/evaluate/per_class.csv",
        curves="results/evaluate/curves.png",
        predictions="results/evaluate/predictions.csv",
    log:
        "logs/evaluate.log",
    benchmark:
        "benchmarks/evaluate.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        code=code("evaluate", "split", "dataset", "training", "lightning", "models"),
    script:
        "../../scripts/evaluate.py"
