# imgpipe: clean -> augment -> train -> sweep / k-fold -> evaluate -> cluster -> report.
# Every stage writes files under results/; each rule's params hold only the
# config it depends on plus a fingerprint of the imgpipe code it runs.


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/clean.smk"


rule all:
    input:
        "results/clean/index.csv",
        "results/clean/summary.json",
    default_target: True
