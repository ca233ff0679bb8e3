# The effective configuration as a file: its params are the whole config, so
# any config change rewrites it and thereby reruns the report, while the
# report's own params (the report section) rerun nothing else. The progress
# switch changes no result: it is left out.
rule config_snapshot:
    input:
        # image.size / image.mode as resolved for this data (auto -> inferred).
        image=IMAGE_SETTINGS,
    output:
        config="results/config.yaml",
    log:
        "logs/config_snapshot.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        config=configured(),
        configfiles=[str(path) for path in workflow.configfiles],
        code=code("config_snapshot"),
    script:
        "../../scripts/config_snapshot.py"


# The page, its headline numbers and a row in results/runs.csv (one per run,
# not a declared output: Snakemake would delete it before every report job).
rule report:
    input:
        # Every file the page shows; sweep and cluster files only when configured,
        # and the training histories of the trials, folds and final model.
        unpack(report_inputs),
    output:
        html=report(
            "results/report/index.html",
            caption="../report/results_page.rst",
            category="Summary",
        ),
        summary="results/report/summary.json",
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        report=config["report"],
        runs="results/runs.csv",
        code=code("report"),
    script:
        "../../scripts/report.py"
