# The final model as ONNX (dynamic batch axis) and TorchScript, each with a JSON
# sidecar (input, preprocessing, class names, the model file's metadata). Not part
# of the default target: `snakemake --cores 2 export` (or results/export/model.onnx).
rule export:
    input:
        model=rules.train_final.output.model,
    output:
        onnx="results/export/model.onnx",
        onnx_meta="results/export/model.onnx.json",
        torchscript="results/export/model.pt",
        torchscript_meta="results/export/model.pt.json",
    log:
        "logs/export.log",
    benchmark:
        "benchmarks/export.tsv"
    conda:
        "../../envs/train.yaml"
    params:
        export=config["export"],
        code=code("export"),
    script:
        "../../scripts/export.py"
