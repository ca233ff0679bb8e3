##### pretrained weights by name #####

# model.weights: imagenet or a timm tag (timm/<arch>.<tag>) names the library's
# own pretrained weights, kept in its own cache (torch.hub's for torchvision,
# the Hugging Face cache for timm; imgpipe.pretrained). They are fetched once,
# by a localrule on the machine that runs Snakemake (cluster nodes are often
# offline), before any training job; training only reads the cache. Without
# named weights (a path, or null) no fetch job exists.
import re
from dataclasses import asdict

from imgpipe.pretrained import cached_file, missing_offline_error, needed_files

# slug -> the cache file, for the model section and the sweep grid's model.* values.
PRETRAINED = needed_files(config)
PRETRAINED_RECORD = "results/weights/{slug}.json"


def check_pretrained_cache():
    """Stop at start-up when a needed file is missing and HF_HUB_OFFLINE says no fetch can work;
    forget the record of a fetch whose file has left the cache, so the rule fetches it again.
    """
    error = missing_offline_error(PRETRAINED)
    if error:
        raise WorkflowError(error)
    for slug, spec in PRETRAINED.items():
        record = Path(PRETRAINED_RECORD.format(slug=slug))
        if record.is_file() and cached_file(spec) is None:
            record.unlink()


check_pretrained_cache()


def pretrained_records(wildcards):
    """The fetch records every training job waits for ([] without named weights: no job)."""
    return [PRETRAINED_RECORD.format(slug=slug) for slug in PRETRAINED]


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
