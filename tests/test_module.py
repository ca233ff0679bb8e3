"""imgpipe deployed the catalog way: a user's own folder uses the workflow as a Snakemake module.

The user's Snakefile holds only ``configfile:``, ``module imgpipe:`` and ``use
rule * from imgpipe as imgpipe_*``; everything the workflow ships (schema,
scripts, envs, report captions, the imgpipe package) must be found from the
workflow's own folder, while results, logs and benchmarks land in the user's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers.workflow_utils import REPO, TEST_CONFIG_FILE, snakemake

pytestmark = pytest.mark.slow

USER_SNAKEFILE = """\
configfile: "config/config.yaml"


module imgpipe:
    snakefile:
        "{snakefile}"
    config:
        config


use rule * from imgpipe as imgpipe_*
"""


def user_folder(root: Path, config: dict) -> Path:
    """A user's project: their Snakefile and config/config.yaml, nothing of imgpipe's."""
    (root / "config").mkdir(parents=True)
    (root / "Snakefile").write_text(USER_SNAKEFILE.format(snakefile=REPO / "Snakefile"))
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def test_whole_dag_runs_as_a_module_from_a_users_folder(tmp_path):
    config = yaml.safe_load(TEST_CONFIG_FILE.read_text())
    config["data"]["root"] = str(REPO / ".test" / "data")
    user = user_folder(tmp_path / "project", config)
    repo_results = (
        sorted(p.name for p in (REPO / "results").glob("*")) if (REPO / "results").exists() else []
    )

    snakemake(user, timeout=900)

    report = user / "results" / "report" / "index.html"
    assert report.is_file() and report.stat().st_size > 10_000
    metrics = json.loads((user / "results" / "evaluate" / "metrics.json").read_text())
    roles = pd.read_csv(user / "results" / "split" / "split.csv")["role"]
    assert metrics["n_test"] == (roles == "test").sum() > 0
    assert (user / "logs" / "train" / "final.log").is_file()
    assert (user / "benchmarks" / "report.tsv").is_file()
    # The jobs ran as the module's (prefixed) rules, and nothing landed in the workflow's folder.
    run_log = next((user / ".snakemake" / "log").glob("*.snakemake.log")).read_text()
    assert "imgpipe_train_final" in run_log
    after = (
        sorted(p.name for p in (REPO / "results").glob("*")) if (REPO / "results").exists() else []
    )
    assert after == repo_results


def test_a_config_with_only_data_root_plans_every_stage(tmp_path):
    user = user_folder(tmp_path / "project", {"data": {"root": "demo"}})
    proc = snakemake(user, "-n", "--quiet", "rules")
    planned = proc.stdout + proc.stderr
    for rule in ("imgpipe_demo_data", "imgpipe_train_final", "imgpipe_cluster", "imgpipe_report"):
        assert rule in planned, planned[-2000:]


def test_a_bad_key_in_the_users_config_is_named(tmp_path):
    user = user_folder(tmp_path / "project", {"data": {"root": "demo"}, "train": {"lr": -1}})
    proc = snakemake(user, "-n", check=False)
    assert proc.returncode != 0
    assert "train.lr" in proc.stdout + proc.stderr
