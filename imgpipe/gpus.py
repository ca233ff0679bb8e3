"""Give concurrent jobs on one machine disjoint GPUs.

Snakemake's ``--resources gpu=2`` only counts GPUs: two jobs asking for one
each are both told nothing about *which*. ``claim_devices`` picks free device
indices by taking an exclusive ``fcntl.flock`` on one lock file per index. The
kernel drops a lock when its holder exits, however it exits, so a killed job
never leaves a stale claim. Under SLURM the allocation already chose the GPUs
(and set CUDA_VISIBLE_DEVICES): nothing is claimed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("imgpipe")

DEFAULT_LOCK_DIR = ".imgpipe/gpu-locks"


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


def candidate_devices(total: int | None) -> list[str]:
    """The device ids jobs may claim: CUDA_VISIBLE_DEVICES when set, else 0..total-1."""
    visible = visible_devices()
    if visible is not None:
        return visible
    return [str(i) for i in range(count_gpus() if total is None else total)]


def _lock_name(device: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


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
    set, limits the candidates. On a machine without GPUs, or with ``n == 0``,
    it yields [] and changes nothing. Under SLURM it yields the allocation's
    devices. When fewer than ``n`` are free it polls every ``poll_s`` seconds
    (up to ``timeout_s``, then TimeoutError); it never holds some while
    waiting for others, so two waiting jobs cannot deadlock.
    """
    if os.environ.get("SLURM_JOB_ID") and visible_devices() is not None:
        yield visible_devices()
        return
    candidates = candidate_devices(total)
    if n <= 0 or not candidates:
        yield []
        return
    if n > len(candidates):
        raise ValueError(f"asked for {n} GPUs but this machine has {len(candidates)}")
    directory = Path(lock_dir)
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
    log.info("claimed GPU(s) %s", ",".join(held))
    try:
        yield list(held)
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
        release(list(held.values()))
