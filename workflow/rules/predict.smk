# Predict new images with the final model: only when the config has a predict
# section (predict: {input: <folder or CSV manifest>, name: <run name>}), so the
# default DAG does not change. The input is only read. Settings (topk,
# output_type, format, batch_size, device, workers) as imgpipe predict's flags.
if config.get("predict"):

    rule predict:
        input:
            model=rules.train_final.output.model,
            images=config["predict"]["input"],
        output:
            # predictions.csv, .json or .parquet: predict.format.
            predictions=f"results/predict/{config['predict']['name']}/predictions.{config['predict'].get('format', 'csv')}",
            montage=f"results/predict/{config['predict']['name']}/montage.png",
            metrics=f"results/predict/{config['predict']['name']}/metrics.json",
        log:
            f"logs/predict/{config['predict']['name']}.log",
        benchmark:
            f"benchmarks/predict/{config['predict']['name']}.tsv"
        conda:
            "../../envs/train.yaml"
        threads: 4
        params:
            settings=config["predict"],
            # Reruns when files are added to, removed from or changed in the input.
            images=tree_fingerprint(
                config["predict"]["input"],
                config["predict"]["follow_symlinks"],
            ),
            code=code("predict"),
        script:
            "../../scripts/predict.py"
