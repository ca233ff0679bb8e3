##### pretrained weights by name #####

# model.weights: imagenet or a timm tag (timm/<arch>.<tag>) names the library's
# own pretrained weights, kept in its own cache (torch.hub's for torchvision,
# the Hugging Face cache for timm; imgpipe.learn.pretrained). They are fetched once,
# by a localrule on the machine that runs Snakemake (cluster nodes are often
# offline), before any training job; training only reads the cache. Without
# named weights (a path, or null) no fetch job exists.
# (the slugs, the start-up check and the input function live in common.smk)


rule fetch_weights:
    output:
        record=PRETRAINED_RECORD,
    log:
        "logs/weights/{slug}.log",
    wildcard_constraints:
        slug="|".join(re.escape(slug) for slug in PRETRAINED) or "(?!)",
    localrule: True
    conda:
        "../../envs/train.yaml"
    params:
        weights=lambda wildcards: asdict(PRETRAINED[wildcards.slug]),
        code=code("fetch_weights"),
    script:
        "../../scripts/fetch_weights.py"
