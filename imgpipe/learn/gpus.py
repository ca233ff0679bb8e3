"""Give concurrent jobs on one machine, or in one SLURM allocation, disjoint GPUs.

Snakemake's ``--resources gpu=2`` only counts GPUs: two jobs asking for one
each are both told nothing about *which*. ``claim_devices`` picks free device
indices by taking an exclusive ``fcntl.flock`` on one lock file per index. The
kernel drops a lock when its holder exits, however it exits, so a killed job
never leaves a stale claim.

The candidates are CUDA_VISIBLE_DEVICES when it is set (inside a SLURM job: the
GPUs the allocation gave), else every GPU of the machine. The lock files live
in a folder named after the host, and inside a SLURM job after the host and the
job id (``<lock_dir>/<host>/`` or ``<lock_dir>/<host>-<jobid>/``): jobs of one
``salloc`` on one node get distinct GPUs of the allocation, while separate
SLURM jobs (each owns its GPUs) and jobs on other nodes that share the project
folder never contend for the same lock.

Inference (evaluate, cluster, cv predictions) wraps its GPU work in
``claim_for_inference``, which holds one device for the block and yields the
torch device string to use ("cuda", or "cpu" on a machine without GPUs).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("imgpipe")

DEFAULT_LOCK_DIR = ".imgpipe/gpu-locks"
# What CUDA accepts in CUDA_VISIBLE_DEVICES; it ignores everything from the
# first other entry on ("-1", "NoDevFiles": no device at all).
_DEVICE_ID = re.compile(r"^(\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)$")

# The devices CUDA was initialised with in this process (by a claimed block):
# CUDA reads CUDA_VISIBLE_DEVICES once, so later claims must take the same GPU.
_cuda_devices: list[str] | None = None


def visible_devices() -> list[str] | None:
    """Entries of CUDA_VISIBLE_DEVICES, or None when it is unset."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def count_gpus() -> int:
    """Number of NVIDIA GPUs on this machine, found without initialising CUDA in this process.

    CUDA reads CUDA_VISIBLE_DEVICES once, when it initialises: counting with
    torch.cuda here could freeze the device list before we restrict it.
    """
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return len(list(proc.iterdir()))
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return (
        len(re.findall(r"^GPU \d+", out.stdout, flags=re.MULTILINE)) if out.returncode == 0 else 0
    )


def local_gpus_present() -> bool:
    """Whether this machine has NVIDIA devices, from the driver's device node alone.

    The Snakefile asks while it builds the DAG: no torch, no subprocess.
    """
    return Path("/dev/nvidiactl").exists()


def gpu_supports_bf16() -> bool:
    """True when every visible GPU has compute capability >= 8.0 (asks nvidia-smi: CUDA stays uninitialised)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        caps = [float(line) for line in out.stdout.split()] if out.returncode == 0 else []
    except (OSError, ValueError, subprocess.SubprocessError):
        caps = []
    return bool(caps) and min(caps) >= 8.0


def candidate_devices(total: int | None) -> list[str]:
    """The device ids jobs may claim: CUDA_VISIBLE_DEVICES when set, else 0..total-1.

    Like CUDA, it reads CUDA_VISIBLE_DEVICES up to its first entry that names
    no device: "" or "-1" (CUDA disabled) leave no candidate.
    """
    visible = visible_devices()
    if visible is None:
        return [str(i) for i in range(count_gpus() if total is None else total)]
    candidates = []
    for device in visible:
        if not _DEVICE_ID.match(device):
            break
        candidates.append(device)
    return candidates


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def lock_namespace() -> str:
    """The lock folder's name for this process: ``<host>``, or ``<host>-<jobid>`` in a SLURM job."""
    host = _safe(socket.gethostname()) or "localhost"
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    return f"{host}-{_safe(job)}" if job else host


def _lock_name(device: str) -> str:
    return "gpu-" + _safe(device) + ".lock"


def try_claim(device: str, lock_dir: Path) -> int | None:
    """Take the device's lock without waiting; return the open descriptor, or None if held."""
    fd = os.open(lock_dir / _lock_name(device), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for a curious human; the lock is what counts
    return fd


def release(fds: Sequence[int]) -> None:
    """Drop the locks (closing the descriptors releases them)."""
    for fd in fds:
        os.close(fd)


def _too_many(n: int, candidates: Sequence[str]) -> str:
    have = len(candidates)
    if visible_devices() is None:
        return f"asked for {n} GPUs but this machine has {have}"
    where = os.environ.get("SLURM_JOB_ID")
    scope = f"SLURM job {where}" if where else "this job"
    return (
        f"asked for {n} GPUs but {scope} sees only {have}"
        f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
        + ("; ask the allocation for more (--gpus / --gres)" if where else "")
    )


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")  # never import torch just to ask
    return bool(torch is not None and torch.cuda.is_initialized())


@contextlib.contextmanager
def _claim_among(
    candidates: list[str],
    n: int,
    lock_dir: str | os.PathLike,
    poll_s: float,
    timeout_s: float | None,
) -> Iterator[list[str]]:
    global _cuda_devices
    directory = Path(lock_dir) / lock_namespace()
    directory.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waited = False
    while True:
        held: dict[str, int] = {}
        for device in candidates:
            fd = try_claim(device, directory)
            if fd is not None:
                held[device] = fd
                if len(held) == n:
                    break
        if len(held) == n:
            break
        release(list(held.values()))
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no {n} free GPUs among {candidates} after {timeout_s} s")
        if not waited:
            log.info("waiting for %d free GPU(s) among %s", n, candidates)
            waited = True
        time.sleep(poll_s)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(held)
    log.info("claimed GPU(s) %s (%s)", ",".join(held), directory)
    cuda_before = _cuda_initialised()
    try:
        yield list(held)
    finally:
        if not cuda_before and _cuda_devices is None and _cuda_initialised():
            _cuda_devices = list(held)
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
        release(list(held.values()))


@contextlib.contextmanager
def claim_devices(
    n: int,
    lock_dir: str | os.PathLike = DEFAULT_LOCK_DIR,
    total: int | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
) -> Iterator[list[str]]:
    """Claim ``n`` free GPUs for the duration of the block and set CUDA_VISIBLE_DEVICES to them.

    Yields the claimed device ids. ``total`` fakes the machine's GPU count
    (tests); by default the GPUs are counted, and CUDA_VISIBLE_DEVICES, when
    set, limits the candidates (in a SLURM job: the allocation's GPUs). On a
    machine without GPUs, or with ``n == 0``, it yields [] and changes nothing;
    asking for more GPUs than the candidates is a ValueError. When fewer than
    ``n`` are free it polls every ``poll_s`` seconds (up to ``timeout_s``, then
    TimeoutError); it never holds some while waiting for others, so two
    waiting jobs cannot deadlock.
    """
    candidates = candidate_devices(total)
    if n <= 0 or not candidates:
        yield []
        return
    if n > len(candidates):
        raise ValueError(_too_many(n, candidates))
    with _claim_among(candidates, n, lock_dir, poll_s, timeout_s) as held:
        yield held


def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def claim_for_inference(
    lock_dir: str | os.PathLike = DEFAULT_LOCK_DIR,
    total: int | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
) -> Iterator[str]:
    """Hold one GPU for an inference block; yield the torch device to use, "cuda" or "cpu".

    On a machine without GPUs, or with CUDA disabled (CUDA_VISIBLE_DEVICES ""
    or "-1"), it yields "cpu" and claims nothing. Otherwise it claims one free
    device like ``claim_devices`` (waiting while all are held), so inference
    never shares a GPU with a training job or another inference; when torch
    then finds no usable CUDA (a CPU-only build) the claim is dropped and it
    yields "cpu". Once CUDA is initialised in this process it stays on its
    first device, so later claims wait for that very device.
    """
    has_gpus = (count_gpus() if total is None else total) > 0
    candidates = candidate_devices(total) if has_gpus else []
    if not candidates:
        yield "cpu"
        return
    if _cuda_devices is not None:
        candidates = _cuda_devices[:1]
    elif _cuda_initialised():  # initialised outside any claim: "cuda" is its first candidate
        candidates = candidates[:1]
    with contextlib.ExitStack() as claim:
        claim.enter_context(_claim_among(candidates, 1, lock_dir, poll_s, timeout_s))
        usable = _cuda_usable()
        if not usable:
            claim.close()
        yield "cuda" if usable else "cpu"
