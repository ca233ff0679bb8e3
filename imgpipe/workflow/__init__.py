"""The Snakemake side: the job a rule hands a stage, config validation, typed settings, code fingerprints."""
