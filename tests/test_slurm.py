"""Integration test: the workflow through profiles/slurm on a real single-node SLURM.

A private SLURM (munged + slurmctld + slurmd, two fake GPUs) is brought up by
tests/helpers/slurm_cluster.py. The same small DAG is run twice in one copy of the
workflow: locally (profiles/default), then through SLURM with a test profile
derived from profiles/slurm. The test checks that every job went through
SLURM (job ids in Snakemake's log; SLURM itself, asked with squeue and
``scontrol show job``, knows each job and ran it on its node) and that both
runs wrote the same results. Every wait is a poll with a deadline on a state
SLURM or a file reports, never a sleep.

Needs root on Debian (it apt-get installs munge and SLURM when missing);
skipped elsewhere. To extend the DAG, add targets to DAG_TARGETS (and config
overrides to TEST_CONFIG): every .csv/.json/.npy the local run writes is
compared with the SLURM run's.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from helpers.slurm_cluster import (  # noqa: E402
    PARTITION,
    SlurmCluster,
    ensure_installed,
    node_hardware,
    parse_job_record,
    skip_reason,
    was_allocated,
)

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
# What a copy of the workflow needs (results/, .snakemake/ and the venv stay out).
WORKFLOW_PARTS = ["Snakefile", "workflow", "config", "imgpipe", "scripts", "profiles", "envs"]

DAG_TARGETS = ["results/clean/index.csv", "results/clean/summary.json"]
# Deep-merged into config/config.yaml; data.root is set to the generated tree.
TEST_CONFIG = {
    "ingest": {"shards": 2},
    "clean": {"min_per_class": 2},
    "cv": {"k": 2, "adapt_k": True},
}
# Rules that run on the submit host, not as SLURM jobs.
LOCAL_RULES = {"all"}
TRAIN_RULE = "train_final"
TRAIN_TARGET = "results/train/final/summary.json"
TRAIN_CONFIG = {"train": {"max_epochs": 1, "batch_size": 8}, "sweep": {"enabled": False}}

# Bounds: Snakemake ignores SIGTERM while jobs run, hence `timeout -k`.
SNAKEMAKE_TIMEOUT_S = 300
SUBMITTED_RE = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+)")
RUN_ID_RE = re.compile(r"SLURM run ID: (\S+)")

pytestmark = pytest.mark.slurm


# ----- helpers -----


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated with ``extra``, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def write_image_tree(root: Path) -> None:
    """A tiny labelled tree: 3 digit classes x 6 images, one exact duplicate, one broken file."""
    import cv2

    from imgpipe.stages.demo import digits_images

    images, labels = digits_images()
    for label in (0, 1, 7):
        class_dir = root / str(label)
        class_dir.mkdir(parents=True)
        for n, index in enumerate(np.flatnonzero(labels == label)[:6]):
            big = cv2.resize(images[index], (16, 16), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(class_dir / f"{n}.png"), big)
    shutil.copy(root / "0" / "0.png", root / "0" / "copy-of-0.png")
    (root / "7" / "broken.png").write_bytes(b"not an image")


def copy_workflow(dest: Path) -> None:
    """Copy the parts of the repository a run needs into ``dest``."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in WORKFLOW_PARTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)


def write_config(workdir: Path, data_root: Path, extra: dict) -> None:
    """Overwrite the copy's config/config.yaml with the test settings."""
    path = workdir / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config = deep_merge(config, {"data": {"root": str(data_root)}, **extra})
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def adapted_profile(slurm_profile: dict) -> dict:
    """profiles/slurm adapted to the test cluster; every other key is kept as it is.

    The adaptations are the ones docs/cluster.md tells a user to make: the
    partition, memory that fits the node, no account, and squeue as the status
    command because there is no accounting database (slurmdbd) here.
    """
    profile = dict(slurm_profile)
    profile["default-resources"] = {"slurm_partition": PARTITION, "mem_mb": 500, "runtime": 10}
    profile["set-resources"] = {
        rule: {**res, "slurm_partition": PARTITION, "mem_mb": 500, "runtime": 10}
        | ({"cpus_per_gpu": 1} if "cpus_per_gpu" in res else {})
        for rule, res in (slurm_profile.get("set-resources") or {}).items()
    }
    profile["set-threads"] = {rule: 1 for rule in slurm_profile.get("set-threads") or {}}
    profile["slurm-status-command"] = "squeue"
    profile["slurm-init-seconds-before-status-checks"] = 1
    profile["latency-wait"] = 5
    profile["retries"] = 0
    return profile


def write_test_profile(workdir: Path) -> Path:
    """Write profiles/slurm-test/config.yaml in the copy; return its folder."""
    slurm = yaml.safe_load((workdir / "profiles" / "slurm" / "config.yaml").read_text())
    folder = workdir / "profiles" / "slurm-test"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(adapted_profile(slurm), sort_keys=False))
    return folder


# Snakemake with the SLURM plugin polling squeue every POLL_S seconds. The
# plugin waits 10 s longer after each poll that finds no finished job (up to
# 3 min); with jobs of 8-15 s here that tripled the test's time. Only the
# cadence changes: the polling itself (squeue) is the plugin's own.
POLL_S = 2
SNAKEMAKE_POLLING_FAST = f"""
import sys
from snakemake_executor_plugin_slurm import Executor
Executor.next_seconds_between_status_checks = property(lambda self: {POLL_S}, lambda self, v: None)
from snakemake.cli import main
sys.argv[0] = "snakemake"
sys.exit(main())
"""


def run_snakemake(
    workdir: Path, args: list[str], env: dict, log: Path
) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir`` under a hard time limit; keep its output in ``log``."""
    if "--workflow-profile" in args:
        snakemake = [sys.executable, "-c", SNAKEMAKE_POLLING_FAST]
    else:
        snakemake = [SNAKEMAKE]
    cmd = ["timeout", "-k", "10", str(SNAKEMAKE_TIMEOUT_S), *snakemake, *args]
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        pytest.fail(f"snakemake {' '.join(args)} exited with {done.returncode}:\n{tail}")
    return done


def rule_names(workdir: Path, env: dict) -> set[str]:
    """The rules of the workflow copy (``snakemake --list-rules``)."""
    out = subprocess.run(
        [SNAKEMAKE, "--list-rules"], cwd=workdir, env=env, capture_output=True, text=True
    )
    return set(out.stdout.split())


def result_files(results: Path) -> dict[str, Path]:
    """The comparable outputs under ``results`` (csv, json, npy) by relative path."""
    return {
        str(p.relative_to(results)): p
        for p in sorted(results.rglob("*"))
        if p.suffix in {".csv", ".json", ".npy"} and p.is_file()
    }


def same_content(a: Path, b: Path) -> bool:
    """Whether two result files hold the same data."""
    if a.suffix == ".npy":
        x, y = np.load(a), np.load(b)
        return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    if a.suffix == ".json":
        return json.loads(a.read_text()) == json.loads(b.read_text())
    return pd.read_csv(a).equals(pd.read_csv(b))


def allocated_gpus(cluster: SlurmCluster, job: str) -> int:
    """GPUs SLURM allocated to a job, running or ended (``scontrol show job``: ``JOB_GRES=gpu:1``)."""
    details = cluster.run(["scontrol", "show", "job", "-d", job]).stdout
    found = re.search(r"JOB_GRES=gpu(?::\w+)?:(\d+)", details)
    return int(found.group(1)) if found else 0


def report_line(request: pytest.FixtureRequest, text: str) -> None:
    """Print a line on the terminal even when pytest captures output."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(text, flush=True)


# ----- fixtures -----


@dataclass
class SlurmRun:
    """A workflow copy run locally and then through SLURM."""

    workdir: Path
    data_root: Path
    profile: Path
    env: dict
    log: Path
    local_results: Path
    seconds: dict


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    reason = skip_reason()
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        reason = "snakemake-executor-plugin-slurm is not installed (pip install '.[slurm]')"
    if reason:
        pytest.skip(f"local SLURM cannot be set up: {reason}")
    start = time.monotonic()
    ensure_installed()
    slurm = SlurmCluster(gpus=2)
    try:
        slurm.start()
        report_line(
            request, f"\n[slurm] cluster up in {time.monotonic() - start:.1f} s ({slurm.root})"
        )
        yield slurm
    finally:
        slurm.stop()
        # Keep the daemons' logs beside pytest's other temporary files.
        shutil.copytree(
            slurm.root / "log", tmp_path_factory.mktemp("slurm-logs"), dirs_exist_ok=True
        )
        slurm.remove()
        report_line(request, f"[slurm] SLURM tests took {time.monotonic() - start:.1f} s in all")


@pytest.fixture(scope="module")
def slurm_run(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory, request) -> SlurmRun:
    base = tmp_path_factory.mktemp("slurm-dag")
    data_root = base / "images"
    write_image_tree(data_root)
    workdir = base / "wf"
    copy_workflow(workdir)
    write_config(workdir, data_root, TEST_CONFIG)
    profile = write_test_profile(workdir)
    env = cluster.env()
    env.pop("SLURM_JOB_ID", None)
    seconds = {}

    start = time.monotonic()
    run_snakemake(workdir, ["--cores", "2", *DAG_TARGETS], env, base / "local.log")
    seconds["local"] = time.monotonic() - start
    local_results = base / "results-local"
    (workdir / "results").rename(local_results)
    shutil.rmtree(workdir / ".snakemake", ignore_errors=True)

    start = time.monotonic()
    log = base / "slurm.log"
    run_snakemake(workdir, ["--workflow-profile", str(profile), *DAG_TARGETS], env, log)
    seconds["slurm"] = time.monotonic() - start
    report_line(
        request,
        f"[slurm] DAG {DAG_TARGETS}: local {seconds['local']:.1f} s, "
        f"through SLURM {seconds['slurm']:.1f} s",
    )
    return SlurmRun(workdir, data_root, profile, env, log, local_results, seconds)


# ----- tests -----


def wait_for_file(path: Path, timeout_s: float = 60) -> str:
    """Shell words that poll for ``path`` and fail the job when it does not appear in time."""
    return f"timeout {timeout_s:.0f} sh -c 'until [ -e {path} ]; do sleep 0.1; done'"


def test_gpu_jobs_get_distinct_gpus_and_cpu_jobs_none(cluster: SlurmCluster, tmp_path: Path):
    """The fake GPUs are scheduled: two concurrent GPU jobs see different devices.

    The GPU jobs wait for each other (a file each, polled with a deadline), so
    they provably hold their GPUs at the same time; a job that never meets the
    other fails instead of passing by luck.
    """
    show = "echo CVD=${CUDA_VISIBLE_DEVICES-unset}"

    def meet(name: str, other: str) -> str:
        return f"{show}; touch {tmp_path / name}.up; {wait_for_file(tmp_path / f'{other}.up')}"

    jobs = {
        "gres1": cluster.sbatch(
            "--gres=gpu:1", "-o", str(tmp_path / "gres1.out"), "--wrap", meet("gres1", "gpus1")
        ),
        "gpus1": cluster.sbatch(
            "--gpus=1", "-o", str(tmp_path / "gpus1.out"), "--wrap", meet("gpus1", "gres1")
        ),
        "cpu": cluster.sbatch("-o", str(tmp_path / "cpu.out"), "--wrap", show),
    }
    seen = {}
    for name, job in jobs.items():
        assert cluster.wait_job(job, timeout_s=120) == "COMPLETED", cluster.logs_tail()
        seen[name] = (tmp_path / f"{name}.out").read_text().strip()
    assert seen["cpu"] == "CVD=unset"
    assert allocated_gpus(cluster, jobs["cpu"]) == 0
    assert allocated_gpus(cluster, jobs["gres1"]) == allocated_gpus(cluster, jobs["gpus1"]) == 1
    # --gres=gpu:1 (what a user writes) and --gpus=1 (what the plugin writes
    # for resources gpu=1) each get one device; running side by side, two.
    assert {seen["gres1"], seen["gpus1"]} == {"CVD=0", "CVD=1"}


# ----- issue 11 point 13: a job started by the backfill scheduler is allocated too -----

# `scontrol show job --oneliner` records from this test cluster (SLURM 22.05).
# A job that backfill started (its log line is "sched/backfill: _start_job:
# Started JobId=3", not "sched: Allocate JobId=3", which the old check read):
BACKFILLED_JOB = (
    "JobId=3 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901757 "
    "Nice=0 Account=(null) QOS=(null) JobState=COMPLETED Reason=None Dependency=(null) "
    "Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 "
    "TimeLimit=00:01:00 TimeMin=N/A SubmitTime=2026-12-01T14:42:55 "
    "EligibleTime=2026-12-01T14:42:55 AccrueTime=2026-12-01T14:42:55 "
    "StartTime=2026-12-01T14:42:56 EndTime=2026-12-01T14:42:56 Deadline=N/A SuspendTime=None "
    "SecsPreSuspend=0 LastSchedEval=2026-12-01T14:42:56 Scheduler=Backfill Partition=debug "
    "AllocNode:Sid=localhost:3235 ReqNodeList=(null) ExcNodeList=(null) NodeList=vm "
    "BatchHost=vm NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* "
    "TRES=cpu=1,mem=1000M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=1 MinMemoryCPU=1000M MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 "
    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) "
    "WorkDir=/tmp/wf StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= "
)
# A pending job that backfill has only planned (SchedNodeList, a future StartTime):
PLANNED_JOB = (
    "JobId=2 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901758 "
    "Nice=0 Account=(null) QOS=(null) JobState=PENDING Reason=None Dependency=(null) "
    "Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 "
    "TimeLimit=00:10:00 TimeMin=N/A SubmitTime=2026-12-01T14:42:55 "
    "EligibleTime=2026-12-01T14:42:55 AccrueTime=2026-12-01T14:42:55 "
    "StartTime=2026-12-01T14:52:55 EndTime=2026-12-01T15:02:55 Deadline=N/A SuspendTime=None "
    "SecsPreSuspend=0 LastSchedEval=2026-12-01T14:42:56 Scheduler=Backfill:* Partition=debug "
    "AllocNode:Sid=localhost:3235 ReqNodeList=(null) ExcNodeList=(null) NodeList= "
    "SchedNodeList=vm NumNodes=1 NumCPUs=2 NumTasks=1 CPUs/Task=2 ReqB:S:C:T=0:0:*:* "
    "TRES=cpu=2,mem=2000M,node=1,billing=2 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=2 MinMemoryCPU=1000M MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 "
    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) "
    "WorkDir=/tmp/wf StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= "
)
# The same job cancelled while pending: StartTime is set (to the cancel time), no NodeList.
CANCELLED_PENDING_JOB = (
    "JobId=2 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901758 "
    "Nice=0 Account=(null) QOS=(null) JobState=CANCELLED Reason=Resources Dependency=(null) "
    "Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 "
    "TimeLimit=00:10:00 TimeMin=N/A SubmitTime=2026-12-01T14:43:05 "
    "EligibleTime=2026-12-01T14:43:05 AccrueTime=2026-12-01T14:43:05 "
    "StartTime=2026-12-01T14:43:07 EndTime=2026-12-01T14:43:07 Deadline=N/A SuspendTime=None "
    "SecsPreSuspend=0 LastSchedEval=2026-12-01T14:43:07 Scheduler=Main Partition=debug "
    "AllocNode:Sid=localhost:3235 ReqNodeList=(null) ExcNodeList=(null) NodeList= "
    "SchedNodeList=vm NumNodes=1 NumCPUs=2 NumTasks=N/A CPUs/Task=2 ReqB:S:C:T=0:0:*:* "
    "TRES=cpu=2,mem=2000M,node=1,billing=2 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
    "MinCPUsNode=2 MinMemoryCPU=1000M MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 "
    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) "
    "WorkDir=/tmp/wf StdErr=/dev/null StdIn=/dev/null StdOut=/dev/null Power= "
)


def test_job_started_by_backfill_counts_as_allocated():
    """Allocation is read from SLURM's record of the job, whichever scheduler started it."""
    record = parse_job_record(BACKFILLED_JOB)
    assert record["Scheduler"] == "Backfill" and record["NodeList"] == "vm"
    assert record["TRES"] == "cpu=1,mem=1000M,node=1,billing=1"
    assert was_allocated(record) and was_allocated(record, node="vm")
    assert not was_allocated(record, node="other")
    assert not was_allocated(parse_job_record(PLANNED_JOB))
    assert not was_allocated(parse_job_record(CANCELLED_PENDING_JOB))
    assert not was_allocated(parse_job_record(""))  # a job the controller forgot


def test_job_started_by_backfill_scheduler_is_seen_as_allocated(
    cluster: SlurmCluster, tmp_path: Path
):
    """A job only backfill can start (a bigger, older job waits for the node) counts as allocated.

    Job A holds one core until a file appears; B, older than C, needs every
    CPU and waits; the main scheduler keeps priority order, so it starts
    nothing behind B: C (one core, a short time limit) starts only when
    backfill places it on the free core.
    """
    hw = node_hardware()
    cores = int(hw["Boards"]) * int(hw["SocketsPerBoard"]) * int(hw["CoresPerSocket"])
    if cores < 2:
        pytest.skip("needs a node of at least 2 cores (one held, one for the backfilled job)")
    gate = tmp_path / "release"
    out = ["-o", "/dev/null"]
    holder = cluster.sbatch("-c", "1", "--time=10", *out, "--wrap", wait_for_file(gate, 120))
    big = small = None
    try:
        assert cluster.wait_job_state(holder, {"RUNNING"}) == "RUNNING", cluster.logs_tail()
        big = cluster.sbatch("-c", hw["CPUs"], "--time=10", *out, "--wrap", "true")
        small = cluster.sbatch("-c", "1", "--time=1", *out, "--wrap", "true")
        assert cluster.wait_job(small) == "COMPLETED", cluster.logs_tail()
        record = cluster.job_record(small)
        # Started while an older job still waited: only backfill does that.
        assert cluster.job_state(big) == "PENDING", cluster.job_record(big)
        assert record.get("Scheduler", "Backfill").startswith("Backfill"), record
        assert cluster.was_allocated(small), record
        assert not cluster.was_allocated(big), cluster.job_record(big)
    finally:
        gate.touch()
        for job in (big, holder):
            if job is not None:
                cluster.run(["scancel", job], check=False)
                cluster.wait_job(job)


def test_every_job_went_through_slurm(slurm_run: SlurmRun, cluster: SlurmCluster):
    log = slurm_run.log.read_text()
    job_ids = SUBMITTED_RE.findall(log)
    assert job_ids, f"no SLURM submissions in the Snakemake log:\n{log[-3000:]}"
    run_id = RUN_ID_RE.search(log).group(1)

    queue = cluster.run(["squeue", "-h", "--states=all", "-o", "%i|%j|%T|%k"]).stdout
    rows = {line.split("|")[0]: line.split("|") for line in queue.splitlines()}
    for job in job_ids:
        assert job in rows, f"job {job} unknown to squeue:\n{queue}"
        _, name, state, _ = rows[job]
        assert name == run_id and state == "COMPLETED", rows[job]
        # SLURM's own record, whichever scheduler (main or backfill) started the job.
        record = cluster.job_record(job)
        assert was_allocated(record, cluster.node), f"SLURM never ran job {job}: {record}"

    # Each job the local run ran is one SLURM job, except rules Snakemake runs
    # on the submit host (the target rule `all`).
    local_jobs = re.findall(
        r"^localrule (\w+):", (slurm_run.log.parent / "local.log").read_text(), re.M
    )
    kept_local = re.findall(r"^localrule (\w+):", log, re.M)
    assert set(kept_local) <= LOCAL_RULES, kept_local
    submitted = [rule_of(rows[job][3]) for job in job_ids]
    assert sorted(submitted) == sorted(r for r in local_jobs if r not in kept_local)


def test_slurm_results_equal_local_results(slurm_run: SlurmRun):
    local = result_files(slurm_run.local_results)
    remote = result_files(slurm_run.workdir / "results")
    assert set(local) == set(remote)
    for target in DAG_TARGETS:
        assert target.removeprefix("results/") in remote
    differ = [name for name in local if not same_content(local[name], remote[name])]
    assert not differ, f"SLURM and local runs differ in {differ}"


DDP_SNAKEFILE = '''
def ddp_resources(nodes, gpus_per_node):
    """SLURM shape of a DDP job: one task per GPU on each node (docs/cluster.md)."""
    return {
        "nodes": nodes,
        "gres": f"gpu:{gpus_per_node}",
        "tasks_per_gpu": 1,
        "tasks": nodes * gpus_per_node,
        "mpi": "srun",
        "cpus_per_gpu": 1,
    }


rule ranks:
    output:
        "ranks.txt",
    resources:
        **ddp_resources(1, 2),
    params:
        launch="srun --nodes=1 --ntasks-per-node=2",
    shell:
        "{params.launch} bash -c 'echo $SLURM_PROCID $SLURM_LOCALID $SLURM_NODEID"
        " $SLURM_NTASKS $SLURM_NTASKS_PER_NODE $SLURM_NNODES $CUDA_VISIBLE_DEVICES'"
        " > {output}"
'''


def test_ddp_job_shape_gives_lightning_one_rank_per_gpu(
    cluster: SlurmCluster, slurm_run: SlurmRun, tmp_path: Path
):
    """The resources recommended for multi-GPU training wire ranks the way Lightning reads them.

    A throw-away Snakefile (not part of the workflow) submits one job with the
    DDP resources through the same test profile; srun inside it starts one task
    per GPU. Lightning's SLURMEnvironment takes world size, ranks and node rank
    from these variables and requires SLURM_NTASKS_PER_NODE == devices.
    """
    (tmp_path / "Snakefile").write_text(DDP_SNAKEFILE)
    run_snakemake(
        tmp_path,
        ["--workflow-profile", str(slurm_run.profile), "--snakefile", "Snakefile"],
        slurm_run.env,
        tmp_path / "ddp.log",
    )
    ranks = sorted(line.split() for line in (tmp_path / "ranks.txt").read_text().splitlines())
    # procid, localid, nodeid, ntasks, ntasks_per_node, nnodes, visible GPUs
    assert ranks == [
        ["0", "0", "0", "2", "2", "1", "0,1"],
        ["1", "1", "0", "2", "2", "1", "0,1"],
    ]


def rule_of(comment: str) -> str:
    """The rule named by the executor's job comment ``rule_<name>[_wildcards_<values>]``."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def check_gpu_job(
    slurm_run: SlurmRun, cluster: SlurmCluster, log: Path, rule: str, target: str, config: dict
) -> None:
    """Run ``target`` through SLURM; the job of ``rule`` must end COMPLETED holding one GPU.

    The GPUs here are fake (no CUDA driver): the job sees CUDA_VISIBLE_DEVICES
    but torch finds no device, so the training code falls back to the CPU.
    """
    write_config(slurm_run.workdir, slurm_run.data_root, deep_merge(TEST_CONFIG, config))
    args = ["--workflow-profile", str(slurm_run.profile), target]
    run_snakemake(slurm_run.workdir, args, slurm_run.env, log)
    queue = cluster.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k"]).stdout
    rows = {line.split("|")[0]: line.split("|") for line in queue.splitlines()}
    job_ids = SUBMITTED_RE.findall(log.read_text())
    gpu_jobs = [job for job in job_ids if rule_of(rows[job][2]) == rule]
    assert len(gpu_jobs) == 1, {job: rows[job] for job in job_ids}
    assert rows[gpu_jobs[0]][1] == "COMPLETED", rows[gpu_jobs[0]]
    assert allocated_gpus(cluster, gpu_jobs[0]) == 1


def test_training_job_gets_a_gpu(slurm_run: SlurmRun, cluster: SlurmCluster, tmp_path: Path):
    if TRAIN_RULE not in rule_names(slurm_run.workdir, slurm_run.env):
        pytest.skip(f"rule {TRAIN_RULE} is not in the workflow yet (snakemake --list-rules)")
    check_gpu_job(
        slurm_run, cluster, tmp_path / "train.log", TRAIN_RULE, TRAIN_TARGET, TRAIN_CONFIG
    )


def test_multi_gpu_training_runs_one_srun_rank_per_gpu(
    slurm_run: SlurmRun, cluster: SlurmCluster, tmp_path: Path
):
    """train.gpus_per_node 2: one job with 2 tasks and 2 GPUs, srun starts 2 DDP ranks (gloo, CPU).

    The profile's ``gpu: 1`` for train_final is deleted, as docs/cluster.md
    (step 5) tells a user to: the rule then asks for the GPUs through gres.
    """
    profile = yaml.safe_load((slurm_run.profile / "config.yaml").read_text())
    profile["set-resources"][TRAIN_RULE].pop("gpu", None)
    ddp_profile = slurm_run.workdir / "profiles" / "slurm-ddp"
    ddp_profile.mkdir(exist_ok=True)
    (ddp_profile / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    config = deep_merge(TRAIN_CONFIG, {"train": {"num_nodes": 1, "gpus_per_node": 2}})
    write_config(slurm_run.workdir, slurm_run.data_root, deep_merge(TEST_CONFIG, config))
    log = tmp_path / "ddp-train.log"
    # The target first: --forcerun takes every word after it as a rule or file to force.
    args = ["--workflow-profile", str(ddp_profile), TRAIN_TARGET, "--forcerun", TRAIN_RULE]
    run_snakemake(slurm_run.workdir, args, slurm_run.env, log)

    job_ids = SUBMITTED_RE.findall(log.read_text())
    queue = cluster.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k"]).stdout
    rows = {line.split("|")[0]: line.split("|") for line in queue.splitlines()}
    train_jobs = [job for job in job_ids if rule_of(rows[job][2]) == TRAIN_RULE]
    assert len(train_jobs) == 1 and rows[train_jobs[0]][1] == "COMPLETED", rows
    details = cluster.run(["scontrol", "show", "job", "-d", train_jobs[0]]).stdout
    assert re.search(r"NumNodes=1\b", details) and re.search(r"NumTasks=2\b", details), details
    assert allocated_gpus(cluster, train_jobs[0]) == 2

    results = slurm_run.workdir / "results" / "train" / "final"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp", summary
    assert len(summary["samples_per_rank"]) == 2 and min(summary["samples_per_rank"]) > 0
    rule_log = (slurm_run.workdir / "logs" / "train" / "final.log").read_text()
    assert "srun --nodes=1 --ntasks-per-node=2 --kill-on-bad-exit=1" in rule_log, rule_log[-3000:]
    # srun --label prefixes each rank's lines with its task id.
    for rank in (0, 1):
        assert re.search(rf"^{rank}: .*rank {rank} of 2 \(node 0", rule_log, re.M), rule_log[-3000:]
    from imgpipe.infer.inference import load_classifier

    assert load_classifier(results / "model.ckpt").model is not None
