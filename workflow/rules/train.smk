# The final model. With a sweep: the winner's settings, trained on the whole
# training pool (train + val) for the epochs the winner needed. Without: the
# train section as is, trained on the train role, best epoch picked on val.
# A killed job resumes from .imgpipe/resume/<hash of its config and inputs>.
rule train_final:
    input:
        unpack(best_params_input),
        **TRAIN_INPUTS,
        # Named pretrained weights (model.weights: imagenet): fetched first.
        pretrained=pretrained_records,
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
    # One process trains with up to 8 cores (a local run caps this at --cores;
    # on SLURM the profile's cpus_per_gpu / set-threads decide).
    threads: 8
    resources:
        **train_final_resources(),
    params:
        model=unswept("model"),
        train=unswept("train"),
        augment=config["augment"],
        # The checks prediction applies to new files (the model file's metadata): a job
        # reads its params only (image size, mode and fit come from results/ingest/image.json).
        clean=config["clean"],
        max_pixels=config["ingest"]["max_pixels"],
        extensions=config["data"]["extensions"],
        code=code("train_final"),
    script:
        "../../scripts/train_final.py"
