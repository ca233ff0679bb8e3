# imgpipe: clean -> augment -> train -> sweep / k-fold -> evaluate -> cluster -> report.
# Every stage writes files under results/; each rule's params hold only the
# config it depends on plus a fingerprint of the code its script runs.
# Usable as it is (snakemake --cores N) or as a module of your own workflow
# (README, "Use imgpipe as a module").
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/clean.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/augment.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/cv.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/predict.smk"


rule all:
    default_target: True
    input:
        "results/report/index.html",
        "results/report/summary.json",
