rule cv_assign:
    input:
        index=rules.clean.output.index,
        split=rules.split.output.split,
    output:
        folds="results/cv/folds.csv",
    log:
        "logs/cv/assign.log",
    benchmark:
        "benchmarks/cv/assign.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        cv=config["cv"],
        seed=config["split"]["seed"],
        code=code("cv_assign"),
    script:
        "../../scripts/cv_assign.py"


rule cv_fold:
    input:
        unpack(best_params_input),
        **TRAIN_INPUTS,
        # Named pretrained weights (model.weights: imagenet): fetched first.
        pretrained=pretrained_records,
        folds=rules.cv_assign.output.folds,
    output:
        oof="results/cv/fold-{fold}/oof.csv",
        summary="results/cv/fold-{fold}/summary.json",
        # Per-epoch losses for the report's training curves (empty for a skipped fold).
        history="results/cv/fold-{fold}/history.csv",
    log:
        "logs/cv/fold-{fold}.log",
    benchmark:
        "benchmarks/cv/fold-{fold}.tsv"
    wildcard_constraints:
        fold=r"\d+",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        gpu=GPUS_PER_JOB,
    params:
        model=unswept("model"),
        train=single_process_train(),
        augment=config["augment"],
        split=fold_split_params(),
        # The image fit the model file records.
        fit=config["image"]["fit"],
        code=code("cv_fold"),
    script:
        "../../scripts/cv_fold.py"


rule cv_summary:
    input:
        index=rules.clean.output.index,
        folds=expand("results/cv/fold-{fold}/oof.csv", fold=range(config["cv"]["k"])),
        fold_summaries=expand(
            "results/cv/fold-{fold}/summary.json", fold=range(config["cv"]["k"])
        ),
    output:
        summary=report(
            "results/cv/summary.csv",
            caption="../report/cv_summary.rst",
            category="Cross-validation",
        ),
        oof="results/cv/oof.csv",
        suspects=report(
            "results/cv/suspect_labels.csv",
            caption="../report/suspect_labels.rst",
            category="Cross-validation",
        ),
        suspects_png=report(
            "results/cv/suspect_labels.png",
            caption="../report/suspect_labels.rst",
            category="Cross-validation",
        ),
    log:
        "logs/cv/summary.log",
    benchmark:
        "benchmarks/cv/summary.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        code=code("cv_summary"),
    script:
        "../../scripts/cv_summary.py"
