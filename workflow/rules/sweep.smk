if config["sweep"]["enabled"]:
    # One job per trial, cached under a readable path such as
    # results/sweep/trials/lr~0.003_dropout~0.3/: adding a grid value adds jobs
    # for the new trials only (each trial's params hold its own values alone).
    TRIALS = Paramspace(
        trial_table(config["sweep"]), filename_params="*", single_wildcard="trial"
    )
    # Built once: a dict lookup per job keeps DAG building fast for big sweeps.
    TRIAL_OVERRIDES = trial_overrides(TRIALS)

    rule sweep_trial:
        input:
            **TRAIN_INPUTS,
            # Named pretrained weights (model.weights: imagenet): fetched first.
            pretrained=pretrained_records,
        output:
            summary="results/sweep/trials/{trial}/summary.json",
            history="results/sweep/trials/{trial}/history.csv",
            model="results/sweep/trials/{trial}/model.ckpt",
        log:
            "logs/sweep/{trial}.log",
        benchmark:
            "benchmarks/sweep/{trial}.tsv"
        conda:
            "../../envs/train.yaml"
        threads: 1
        resources:
            gpu=GPUS_PER_JOB,
        params:
            model=unswept("model"),
            train=single_process_train(),
            augment=config["augment"],
            overrides=lambda wildcards: TRIAL_OVERRIDES[wildcards.trial],
            # The image fit the model file records.
            fit=config["image"]["fit"],
            code=code("sweep_trial"),
        script:
            "../../scripts/sweep_trial.py"

    rule sweep_aggregate:
        input:
            trials=expand(
                "results/sweep/trials/{trial}/summary.json",
                trial=list(TRIALS.instance_patterns),
            ),
        output:
            trials=report(
                "results/sweep/trials.csv",
                caption="../report/sweep.rst",
                category="Sweep",
            ),
            best="results/sweep/best.yaml",
            plot=report(
                "results/sweep/sweep.png",
                caption="../report/sweep.rst",
                category="Sweep",
            ),
        log:
            "logs/sweep/aggregate.log",
        benchmark:
            "benchmarks/sweep/aggregate.tsv"
        conda:
            "../../envs/train.yaml"
        params:
            monitor=config["train"]["monitor"],
            code=code("sweep_aggregate"),
        script:
            "../../scripts/sweep_aggregate.py"
