# The final model as ONNX (dynamic batch axis) and TorchScript, each with a JSON
# sidecar (input, preprocessing, class names, the model file's metadata), the
# preprocessing alone as preprocess.json (also inside the ONNX files'
# metadata_props) and, with export.quantize: int8, model.int8.onnx: static
# quantisation calibrated on training images, its test accuracy beside the float
# model's in both sidecars (the test role, read as evaluate reads it). Not part
# of the default target: `snakemake --cores 2 export` (or results/export/model.onnx).
INT8_OUTPUTS = (
    {
        "int8": "results/export/model.int8.onnx",
        "int8_meta": "results/export/model.int8.onnx.json",
    }
    if config["export"]["quantize"] == "int8"
    else {}
)


rule export:
    input:
        model=rules.train_final.output.model,
        index=rules.clean.output.index,
        split=rules.split.output.split,
        arrays=SHARD_IMAGES,
    output:
        **INT8_OUTPUTS,
        onnx="results/export/model.onnx",
        onnx_meta="results/export/model.onnx.json",
        torchscript="results/export/model.pt",
        torchscript_meta="results/export/model.pt.json",
        preprocess="results/export/preprocess.json",
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
