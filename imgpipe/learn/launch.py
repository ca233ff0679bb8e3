"""Multi-node / multi-GPU DDP through SLURM's srun: one process per GPU, ranks wired by SLURM.

A ``train_final`` job that asks SLURM for ``num_nodes`` x ``gpus_per_node``
GPUs (one task per GPU) runs its script once, on the first node. The script
writes the job description (inputs, split roles, and the run's
``imgpipe.learn.training_run.TrainingRun``: configs, image settings, output, resume
and TensorBoard folders) to a JSON file and starts the ranks with
:func:`srun_command`::

    srun --nodes=N --ntasks-per-node=G --kill-on-bad-exit=1 python -m imgpipe.learn.launch job.json

Each rank (``python -m imgpipe.learn.launch job.json``) loads the data and trains
the run through ``imgpipe.learn.fit.fit_run`` (the local path's own call of
``imgpipe.learn.fit.fit``) with ``devices=G`` and ``num_nodes=N``; Lightning's
SLURMEnvironment reads the rank from ``SLURM_PROCID`` / ``SLURM_LOCALID`` /
``SLURM_NODEID`` and rank 0 writes the outputs. srun's flags are explicit
because Snakemake's job step strips the allocation's SLURM_* variables
(except the job id) before it runs the script.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imgpipe.learn.training_run import LAUNCHED_VAR, TrainingRun, load_training_data

log = logging.getLogger("imgpipe")

JOB_FILE = ".launch-job.json"


def world_size(num_nodes: int, gpus_per_node: int) -> int:
    """Processes of a DDP run over ``num_nodes`` nodes with ``gpus_per_node`` GPUs each."""
    return int(num_nodes) * int(gpus_per_node)


def should_launch(num_nodes: int, gpus_per_node: int, env: Mapping[str, str] = os.environ) -> bool:
    """True inside a SLURM job that must start several ranks with srun (and is not a rank itself)."""
    return (
        world_size(num_nodes, gpus_per_node) > 1
        and bool(env.get("SLURM_JOB_ID"))
        and not env.get(LAUNCHED_VAR)
    )


def srun_command(
    job_path: str | os.PathLike,
    num_nodes: int,
    gpus_per_node: int,
    cpus_per_task: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The srun command line that starts one ``imgpipe.learn.launch`` rank per GPU on every node."""
    cmd = [
        "srun",
        f"--nodes={int(num_nodes)}",
        f"--ntasks-per-node={int(gpus_per_node)}",
        # One failed rank ends the others (they would wait for it in the next collective).
        "--kill-on-bad-exit=1",
        "--label",  # prefix every output line with its rank
    ]
    if cpus_per_task:
        cmd.append(f"--cpus-per-task={int(cpus_per_task)}")
    return [*cmd, python, "-m", "imgpipe.learn.launch", str(job_path)]


def tasks_per_node(env: Mapping[str, str] = os.environ) -> int:
    """Tasks srun started on this node: SLURM_NTASKS_PER_NODE (``"4"``, or ``"4(x2)"`` per node group)."""
    value = env.get("SLURM_NTASKS_PER_NODE", "")
    found = re.match(r"\s*(\d+)", value)
    if not found:
        raise RuntimeError(
            "SLURM_NTASKS_PER_NODE is not set: start the ranks with srun --ntasks-per-node=G"
        )
    return int(found.group(1))


def make_job(
    inputs: Mapping[str, str],
    train_roles: Sequence[str],
    val_roles: Sequence[str],
    run: TrainingRun,
) -> dict[str, Any]:
    """The job description every rank reads: the data, its roles and the run (absolute paths)."""
    return {
        "inputs": {key: str(Path(path).resolve()) for key, path in inputs.items()},
        "train_roles": list(train_roles),
        "val_roles": list(val_roles),
        "run": run.absolute().to_dict(),
    }


def write_job(job: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the job description to ``path`` atomically; return the path."""
    from imgpipe.core.atomic import write_json

    write_json(dict(job), path)
    return Path(path)


def read_job(path: str | os.PathLike) -> dict[str, Any]:
    """Read a job description written by :func:`write_job`."""
    job = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = {"inputs", "train_roles", "val_roles", "run"} - set(job)
    if missing:
        raise ValueError(f"{path}: job description lacks {sorted(missing)}")
    try:
        TrainingRun.from_dict(job["run"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return job


def launch_ranks(
    job: Mapping[str, Any],
    cpus_per_task: int | None = None,
    stdout: Any = None,
) -> dict:
    """From inside the SLURM job: write the job file, srun the ranks, return rank 0's summary.

    ``stdout`` receives every rank's output (each line prefixed with its rank).
    The job file is removed after a successful run and kept after a failure.
    """
    train_cfg = job["run"]["train"]
    nodes, gpus = int(train_cfg["num_nodes"]), int(train_cfg["gpus_per_node"])
    out_dir = Path(job["run"]["out_dir"])
    job_path = write_job(job, out_dir / JOB_FILE)
    cmd = srun_command(job_path, nodes, gpus, cpus_per_task)
    log.info("starting %d rank(s) on %d node(s): %s", nodes * gpus, nodes, " ".join(cmd))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    env = {**os.environ, LAUNCHED_VAR: "1"}
    done = subprocess.run(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"srun exited with {done.returncode} (job file kept: {job_path})")
    job_path.unlink(missing_ok=True)
    return json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))


def run_rank(job: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> dict:
    """Train as the rank SLURM made this process; rank 0 writes the outputs and gets the summary."""
    # Imported here, after main() set up logging: Lightning then adds no handler of its own.
    from imgpipe.learn.fit import fit_run

    run = TrainingRun.from_dict(job["run"])
    data = load_training_data(job["inputs"])
    devices = tasks_per_node(env)
    log.info(
        "rank %s of %s (node %s, local rank %s): %d device(s) per node",
        env.get("SLURM_PROCID"),
        env.get("SLURM_NTASKS"),
        env.get("SLURM_NODEID"),
        env.get("SLURM_LOCALID"),
        devices,
    )
    return fit_run(
        run, data, data.ids(*job["train_roles"]), data.ids(*job["val_roles"]), devices=devices
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imgpipe.learn.launch job.json``: run one rank; logs go to stderr (srun collects them)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m imgpipe.learn.launch JOB.json", file=sys.stderr)
        return 2
    # A handler on the root logger before Lightning is imported: it then adds none of its own.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_rank(read_job(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
