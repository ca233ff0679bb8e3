# The baselines (imgpipe.learn.baselines) are fitted on the final model's training
# images: the train role, or train + val after a sweep (the input best says so).
rule evaluate:
    input:
        unpack(best_params_input),
        index=rules.clean.output.index,
        split=rules.split.output.split,
        arrays=SHARD_IMAGES,
        model=rules.train_final.output.model,
        history=rules.train_final.output.history,
        # Steps and early stopping: the likely causes a warning names.
        train_summary=rules.train_final.output.summary,
    output:
        metrics=report(
            "results/evaluate/metrics.json",
            caption="../report/test_metrics.rst",
            category="Test",
        ),
        confusion="results/evaluate/confusion.csv",
        confusion_png=report(
            "results/evaluate/confusion.png",
            caption="../report/confusion.rst",
            category="Test",
        ),
        per_class=report(
            "results/evaluate/per_class.csv",
            caption="../report/per_class.rst",
            category="Test",
        ),
        curves=report(
            "results/evaluate/curves.png",
            caption="../report/training_curves.rst",
            category="Training",
        ),
        predictions="results/evaluate/predictions.csv",
    log:
        "logs/evaluate.log",
    benchmark:
        "benchmarks/evaluate.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        code=code("evaluate"),
    script:
        "../../scripts/evaluate.py"
