# The final model. With a sweep: the winner's settings, trained on the whole
# training pool (train + val) for the epochs the winner needed. Without: the
# train section as is, trained on the train role, best epoch picked on val.
# A killed job resumes from .imgpipe/resume/<hash of its config and inputs>.
rule train_final:
    input:
        unpack(best_params_input),
        **TRAIN_INPUTS,
    output:
        model="results/train/final/model.ckpt",
        history="results/train/final/history.csv",
        summary="results/train/final/summary.json",
    log:
        "logs/train/final.log",
    benchmark:
        "benchmarks/train/final.tsv"
    conda:
        "../../envs/train.yaml"
    # The whole machine: one process trains with every core (or the job's GPU).
    threads: workflow.cores
    resources:
        gpu=GPUS_PER_JOB,
    params:
        model=config["model"],
        train=config["train"],
        code=code(*TRAIN_CODE),
    script:
        "../../scripts/train.py"
