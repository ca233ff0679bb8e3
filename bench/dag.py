"""DAG-building time (dry run) of our workflow against a bare Snakefile of the same shape.

Both are dry-run from an empty working directory with an N-trial sweep and 5
folds, in one run, so the ratio compares like with like:

    .venv/bin/python bench/dag.py            # 500 and 5,000 trials
    .venv/bin/python bench/dag.py --trials 100
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

BARE = r"""
import pandas as pd
from snakemake.utils import Paramspace

TRIALS = Paramspace(pd.DataFrame({"lr": [i / 1e6 + 1e-4 for i in range(config["n"])]}),
                    filename_params="*", single_wildcard="trial")
FOLDS = range(5)

rule all:
    input: "report.txt"

rule demo:
    output: "demo.txt"
    shell: "touch {output}"

rule ingest:
    input: "demo.txt"
    output: "ingest-{shard}.txt"
    shell: "touch {output}"

rule clean:
    input: expand("ingest-{shard}.txt", shard=range(2))
    output: "clean.txt"
    shell: "touch {output}"

rule augment:
    input: "clean.txt"
    output: "augment.txt"
    shell: "touch {output}"

rule trial:
    input: "augment.txt"
    output: f"sweep/{TRIALS.wildcard_pattern}.txt"
    params: lr=lambda wc: TRIALS.instance(wc)["lr"]
    shell: "touch {output}"

rule aggregate:
    input: expand("sweep/{trial}.txt", trial=list(TRIALS.instance_patterns))
    output: "best.txt"
    shell: "touch {output}"

rule fold:
    input: "best.txt"
    output: "fold-{fold}.txt"
    shell: "touch {output}"

rule final:
    input: expand("fold-{fold}.txt", fold=FOLDS)
    output: "final.txt"
    shell: "touch {output}"

rule report:
    input: "final.txt"
    output: "report.txt"
    shell: "touch {output}"
"""


def dry_run(args: list[str], cwd: Path) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(
        [SNAKEMAKE, "-n", "--cores", "1", "--quiet", "rules", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)
    match = re.search(r"^total\s+(\d+)", proc.stdout, re.MULTILINE)
    return seconds, int(match.group(1)) if match else -1


def ours(n: int, tmp: Path) -> tuple[float, int]:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["sweep"]["grid"] = {"train.lr": [round(1e-4 + i / 1e6, 7) for i in range(n)]}
    config["cv"]["k"] = 5
    path = tmp / f"ours-{n}.yaml"
    path.write_text(yaml.safe_dump(config))
    work = tmp / f"ours-{n}"
    work.mkdir()
    return dry_run(
        ["-s", str(ROOT / "Snakefile"), "-d", str(work), "--configfile", str(path)], ROOT
    )


def bare(n: int, tmp: Path) -> tuple[float, int]:
    work = tmp / f"bare-{n}"
    work.mkdir()
    (work / "Snakefile").write_text(BARE)
    (work / "n.yaml").write_text(f"n: {n}\n")
    return dry_run(["--configfile", "n.yaml"], work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, nargs="+", default=[500, 5000])
    args = parser.parse_args()
    print(f"{'trials':>7} {'bare s':>8} {'jobs':>6} {'ours s':>8} {'jobs':>6} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.trials:
            bare_s, bare_jobs = bare(n, Path(tmp))
            ours_s, ours_jobs = ours(n, Path(tmp))
            print(
                f"{n:>7} {bare_s:>8.2f} {bare_jobs:>6} {ours_s:>8.2f} {ours_jobs:>6} "
                f"{ours_s / bare_s:>6.2f}x"
            )
    # The headline: the largest DAG, as a speed ratio (above 1: ours builds faster).
    print(f"imgpipe DAG vs bare Snakefile ({n} trials): ratio {bare_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
