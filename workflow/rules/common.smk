import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import Paramspace, validate

# Everything the workflow ships (schema, scripts, the imgpipe package) is found
# from this file's own location, so the workflow also runs as a Snakemake
# module from a user's folder; results, logs and data paths stay relative to
# the working directory (the user's folder).
WORKFLOW_DIR = Path(workflow.current_basedir).parents[1]
sys.path.insert(0, str(WORKFLOW_DIR))

from imgpipe.workflow.config import (
    LAYOUT_KEYS,
    check_config,
    coerce_config,
    load_schema,
)
from imgpipe.learn.gpus import local_gpus_present
from imgpipe.workflow.fingerprint import code_fingerprint
from imgpipe.data.listing import tree_fingerprint
from imgpipe.core.logs import PROGRESS_VAR, progress_wanted
from imgpipe.learn.pretrained import cached_file, missing_offline_error, needed_files
from imgpipe.learn.sweep import overrides, trial_table

##### config validation #####

SCHEMA_PATH = WORKFLOW_DIR / "config" / "schema.yaml"
SCHEMA = load_schema(SCHEMA_PATH)
# Nested --config values arrive as strings (Snakemake reads them with YAML's
# BaseLoader): read each as the type its key declares, then validate.
config.update(coerce_config(config, SCHEMA))
check_config(config, SCHEMA)
# Fills in the schema's defaults for keys a user's config leaves out.
validate(config, schema=str(SCHEMA_PATH))


# The jobs' progress lines on the terminal (imgpipe.core.logs): on unless the config
# says `progress: false` or Snakemake runs with --quiet. Passed to the jobs in
# their environment, not as a param: switching it reruns nothing.
os.environ[PROGRESS_VAR] = (
    "1" if progress_wanted(config["progress"], workflow.output_settings.quiet) else "0"
)


##### paths and input functions #####

DEMO_ROOT = "results/demo/digits"
DEMO_LIST = "results/demo/digits.csv"
SHARDS = list(range(config["ingest"]["shards"]))


def is_demo():
    return config["data"]["root"] == "demo"


def data_root():
    """The image tree or manifest to ingest (the demo tree lives under results/)."""
    return DEMO_ROOT if is_demo() else config["data"]["root"]


def check_data_root():
    """Stop before any job runs when a configured data path does not exist."""
    for key in ("root", "test_root"):
        value = config["data"].get(key)
        if value and value != "demo" and not Path(value).exists():
            raise WorkflowError(
                f"data.{key}: {value!r} does not exist (give an image folder "
                "<root>/<class>/... or a CSV manifest with path,label)"
            )


check_data_root()


def listing_inputs(wildcards):
    return {"demo": DEMO_LIST} if is_demo() else {}


def tree_stamp():
    """A fingerprint of the contents of data.root and data.test_root (names, sizes, mtimes).

    Computed once while the DAG is built (one os.scandir walk, no file read):
    adding, removing, replacing or touching an image at any depth changes it,
    and list_images reruns (a params change).
    """
    follow = config["data"]["follow_symlinks"]
    return {
        key: tree_fingerprint(config["data"][key], follow)
        for key in ("root", "test_root")
        if config["data"].get(key) and config["data"][key] != "demo"
    }


def code(script):
    """Fingerprint of scripts/<script>.py and every imgpipe module it imports (reruns on edits)."""
    return code_fingerprint(WORKFLOW_DIR / "scripts" / f"{script}.py")


##### image settings #####

# image.size / image.mode as ingest used them (auto resolved from the data) live
# in this file, an input of ingest, of the training jobs (their model files
# record it) and of the config snapshot; rules never take them from the config.
IMAGE_SETTINGS = "results/ingest/image.json"
IMAGE_CONFIG = config["image"]
# The report's captions read the config only: once a run has resolved the
# settings they find them under this key (no rule's params hold it).
RESOLVED_IMAGE_KEY = "image_resolved"


def resolved_image():
    """The image section with auto replaced by image.json's values (the config's own before it exists)."""
    resolved = dict(IMAGE_CONFIG)
    if Path(IMAGE_SETTINGS).is_file():
        with open(IMAGE_SETTINGS, encoding="utf-8") as fh:
            settings = json.load(fh)
        resolved.update({key: settings[key] for key in ("size", "mode", "fit")})
    return resolved


def configured():
    """The config as given and validated (defaults filled in), without the resolved image key
    and the progress switch (it decides no result)."""
    return {
        key: value
        for key, value in config.items()
        if key not in (RESOLVED_IMAGE_KEY, "progress")
    }


config[RESOLVED_IMAGE_KEY] = resolved_image()


# The shards' files, listed once (not an input function evaluated per job).
SHARD_STATS = expand("results/ingest/shard-{shard}/stats.csv", shard=SHARDS)
SHARD_IMAGES = expand("results/ingest/shard-{shard}/images.npy", shard=SHARDS)


##### training jobs #####

# A training job asks for one GPU where the machine has NVIDIA devices; on a
# CPU-only machine it asks for none (so --resources gpu=N never serialises CPU
# jobs). The SLURM profile sets the gpu resource of the training rules itself.
GPUS_PER_JOB = 1 if local_gpus_present() else 0
# Every file a training job reads: the clean index, the roles, the shard
# arrays the index points into, the materialised augmented views, and the
# image settings ingest made the arrays with (the model file records them).
TRAIN_INPUTS = {
    "index": "results/clean/index.csv",
    "split": "results/split/split.csv",
    "arrays": SHARD_IMAGES,
    "aug_images": "results/augment/images.npy",
    "aug_index": "results/augment/index.csv",
    "image": IMAGE_SETTINGS,
}


def swept_keys():
    """Dotted keys the sweep sets (empty without a sweep)."""
    sweep = config["sweep"]
    if not sweep["enabled"]:
        return set()
    return set(sweep["grid"] if sweep["method"] == "grid" else sweep["ranges"])


def unswept(name):
    """A config section without the keys the sweep sets: a trial takes those from
    its own values and later jobs from best.yaml, so editing them in the section
    reruns nothing."""
    swept = {key.split(".", 1)[1] for key in swept_keys() if key.startswith(f"{name}.")}
    return {key: value for key, value in config[name].items() if key not in swept}


def single_process_train():
    """The train section of a sweep trial or fold: unswept, without the layout keys."""
    return {k: v for k, v in unswept("train").items() if k not in LAYOUT_KEYS}


def fold_split_params():
    """Without a sweep a fold picks its epoch on an inner split of its training part."""
    return {} if config["sweep"]["enabled"] else config["split"]


def best_params_input(wildcards):
    """The sweep's winner, when there is a sweep (else the train section is used as is)."""
    return {"best": "results/sweep/best.yaml"} if config["sweep"]["enabled"] else {}


def trial_overrides(space):
    """Each trial's path name -> its config overrides (dotted key -> value)."""
    rows = space.dataframe.to_dict("records")
    return {
        name: overrides(row, config["sweep"])
        for name, row in zip(space.instance_patterns, rows)
    }


def train_final_resources():
    """The final training's resources: one GPU, or a DDP layout of nodes x GPUs (docs/cluster.md, step 5).

    With train.num_nodes x train.gpus_per_node > 1 the SLURM job holds
    gpus_per_node GPUs and as many tasks on each of num_nodes nodes; `mpi`
    makes the job run the script once, and the script starts the ranks with
    srun (imgpipe.learn.launch). `gpu` counts this machine's GPUs for local runs
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


##### clustering #####


def cluster_inputs(wildcards):
    inputs = {
        "index": "results/clean/index.csv",
        "split": "results/split/split.csv",
        "arrays": SHARD_IMAGES,
    }
    if wildcards.features == "embeddings":
        inputs["model"] = "results/train/final/model.ckpt"
    return inputs


##### pretrained weights by name (rule fetch_weights in weights.smk) #####

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


##### report inputs #####

# The export sidecars the page shows (each export's test accuracy), asked for
# only once `snakemake export` has made them: the export is not in the default
# target (and the int8 one stays shown while its file is there).
EXPORT_SIDECARS = {
    "export_onnx": "results/export/model.onnx.json",
    "export_int8": "results/export/model.int8.onnx.json",
}


def one_path(pattern, **wildcards):
    """The single path of an output pattern with its wildcards filled in."""
    (path,) = expand(pattern, **wildcards)
    return path


def report_inputs(wildcards):
    """Every file the page shows, under the names the page reads (imgpipe.report).

    Sweep and per-feature cluster files only when configured, the training
    histories and summaries of the trials, folds and final model, and the
    export sidecars that exist. Evaluated once the rules are all defined, so it
    names later rules' outputs; building the DAG imports no page code.
    """
    inputs = {
        "config": rules.config_snapshot.output.config,
        "clean_summary": rules.clean.output.summary,
        "clean_index": rules.clean.output.index,
        "rejected": rules.clean.output.rejected,
        "rejected_examples": rules.clean.output.examples,
        "augment_preview": rules.augment.output.preview,
        "cv_summary": rules.cv_summary.output.summary,
        "suspects": rules.cv_summary.output.suspects,
        "suspects_png": rules.cv_summary.output.suspects_png,
        "test_metrics": rules.evaluate.output.metrics,
        "confusion": rules.evaluate.output.confusion_png,
        "per_class": rules.evaluate.output.per_class,
        "final_history": rules.train_final.output.history,
        # Steps and early stopping: the causes a baseline warning names.
        "final_summary": rules.train_final.output.summary,
    }
    folds = range(config["cv"]["k"])
    if folds:
        inputs["fold_histories"] = expand(rules.cv_fold.output.history, fold=folds)
        inputs["fold_summaries"] = expand(rules.cv_fold.output.summary, fold=folds)
    if config["sweep"]["enabled"]:
        inputs["sweep_trials"] = rules.sweep_aggregate.output.trials
        inputs["sweep_best"] = rules.sweep_aggregate.output.best
        inputs["sweep_plot"] = rules.sweep_aggregate.output.plot
        trials = list(TRIALS.instance_patterns)
        if trials:
            inputs["trial_histories"] = expand(
                rules.sweep_trial.output.history, trial=trials
            )
            inputs["trial_summaries"] = expand(
                rules.sweep_trial.output.summary, trial=trials
            )
    for features in config["cluster"]["features"]:
        for kind in ("metrics", "montage", "scatter"):
            pattern = getattr(rules.cluster.output, kind)
            inputs[f"cluster_{features}_{kind}"] = one_path(pattern, features=features)
    for key, path in EXPORT_SIDECARS.items():
        if Path(path).is_file():
            inputs[key] = path
    return inputs
