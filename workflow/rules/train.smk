def train_final_resources():
    """The final training's resources: one GPU, or a DDP layout of nodes x GPUs (docs/cluster.md, step 5).

    With train.num_nodes x train.gpus_per_node > 1 the SLURM job holds
    gpus_per_node GPUs and as many tasks on each of num_nodes nodes; `mpi`
    makes the job run the script once, and the script starts the ranks with
    srun (imgpipe.launch). `gpu` counts this machine's GPUs for local runs
    (0 on a login node without GPUs: the SLURM job then asks through gres only).
    """
    nodes = config["train"]["num_nodes"]
    gpus = config["train"]["gpus_per_node"]
    if nodes * gpus == 1:
        return {"gpu": GPUS_PER_JOB}
    return {
        "gpu": gpus * GPUS_PER_JOB,
        "nodes": nodes,
        "gres": f"gpu:{gpus}",
        "tasks_per_gpu": 1,
        "tasks": nodes * gpus,
        "mpi": "srun",
    }


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
    # One process trains with up to 8 cores (a local run caps this at --cores;
    # on SLURM the profile's cpus_per_gpu / set-threads decide).
    threads: 8
    resources:
        **train_final_resources(),
    params:
        model=unswept("model"),
        train=unswept("train"),
        code=code(*TRAIN_CODE, "launch"),
    script:
        "../../scripts/train.py"
