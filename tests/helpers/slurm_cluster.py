"""Bring up (and tear down) a private single-node SLURM cluster for the integration test.

Debian's ``munge``, ``slurmctld``, ``slurmd`` and ``slurm-client`` packages are
installed when missing (root on Debian only). Nothing is started by the
packages (no systemd here); this module starts its own ``munged`` (as user
munge, on a private socket), ``slurmctld`` and ``slurmd`` in the foreground,
from a ``slurm.conf`` written into a fresh temporary folder, with free ports on
the loopback address. Every daemon is stopped by its process id in
:meth:`SlurmCluster.stop`.

Fake GPUs: the node declares ``Gres=gpu:N`` backed by character devices made
with ``mknod`` (SLURM only needs device files to schedule and to set
``CUDA_VISIBLE_DEVICES``; no GPU driver is involved).
"""

from __future__ import annotations

import contextlib
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
CLIENTS = ["sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel", "sacct"]
BINARIES = ["munged", "slurmctld", "slurmd", *CLIENTS]
CLUSTER_NAME = "imgpipetest"
PARTITION = "debug"
# Without slurmdbd the controller's memory (squeue, scontrol show job) is the
# only record of a job: finished jobs must stay in it for longer than the
# executor's status-check interval, and until the tests have checked them
# (the whole module, even on a slow machine).
MIN_JOB_AGE_S = 3600
# Job states of a job that was given its node(s) and started (or ran and ended).
STARTED_STATES = {
    "RUNNING",
    "SUSPENDED",
    "COMPLETING",
    "COMPLETED",
    "FAILED",
    "TIMEOUT",
    "CANCELLED",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "DEADLINE",
}


def skip_reason() -> str | None:
    """Why a local SLURM cannot be set up on this machine, or None when it can."""
    if platform.system() != "Linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (installs Debian packages, starts slurmctld/slurmd/munged)"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


def ensure_installed(timeout_s: float = 300) -> None:
    """Install the SLURM and munge packages with apt-get unless every binary is there."""
    if all(shutil.which(b) for b in BINARIES):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout_s)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise RuntimeError(f"apt-get could not install {missing}:\n{done.stderr[-2000:]}")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on the loopback address that nothing listens on now."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:  # all bound at once: the kernel cannot hand out one twice
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def parse_job_record(text: str) -> dict[str, str]:
    """The fields of one ``scontrol show job --oneliner`` record (``Key=Value`` words).

    A word without ``=`` continues the previous value (values may hold spaces).
    """
    record: dict[str, str] = {}
    key = None
    for word in text.strip().splitlines()[0].split() if text.strip() else []:
        name, sep, value = word.partition("=")
        if sep and name:
            key = name
            record[key] = value
        elif key is not None:
            record[key] += " " + word
    return record


def was_allocated(record: dict[str, str], node: str | None = None) -> bool:
    """Whether SLURM's record of a job shows it was given a node and started.

    Whichever scheduler started the job (the main one or backfill), the
    controller's record then holds the node list and a started state; a job
    still pending (even one backfill has planned: ``SchedNodeList``) or
    cancelled before it started has ``NodeList=(null)``. With ``node``, the
    job must have run on that node.
    """
    nodes = record.get("NodeList", "(null)")
    if nodes in ("", "(null)", "None"):
        return False
    if record.get("JobState") not in STARTED_STATES:
        return False
    if record.get("StartTime", "Unknown") in ("", "Unknown", "None"):
        return False
    return node is None or node in nodes.split(",")


def node_hardware() -> dict[str, str]:
    """This machine's node description as ``slurmd -C`` reports it (CPUs, RealMemory, ...)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    return dict(item.split("=", 1) for item in first.split())


@dataclass
class SlurmCluster:
    """A single-node SLURM on this machine; use as a context manager or call start()/stop()."""

    gpus: int = 2
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="imgpipe-slurm-")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    node: str = field(default_factory=socket.gethostname)

    @property
    def conf(self) -> Path:
        """The slurm.conf every client must read (exported as SLURM_CONF by env())."""
        return self.root / "etc" / "slurm.conf"

    @property
    def ctld_log(self) -> Path:
        """slurmctld's log file (kept for reading after a failure; tests ask SLURM itself)."""
        return self.root / "log" / "slurmctld.log"

    @property
    def bin_dir(self) -> Path:
        """Folder of client wrappers that point sbatch, srun, squeue ... at this cluster."""
        return self.root / "bin"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, squeue, snakemake) talking to this cluster.

        SLURM_CONF alone is not enough: Snakemake's job step drops every SLURM_*
        variable before it calls srun inside a job, so the clients are reached
        through wrappers (first on PATH) that set it. On a real cluster the
        clients find /etc/slurm/slurm.conf by themselves.
        """
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- set-up -----

    def start(self, timeout_s: float = 60) -> None:
        """Write the configuration, start munged, slurmctld and slurmd; wait for an idle node."""
        try:
            self._write_files()
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait_for(self._controller_answers, timeout_s, "slurmctld to answer")
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_for(self._node_idle, timeout_s, "the node to become idle")
        except BaseException:
            self.stop()
            raise

    def _write_files(self) -> None:
        self.root.chmod(0o755)  # munged (user munge) must reach its own folder below
        for sub in ("etc", "state", "spool", "log", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        hw = node_hardware()
        devices = []
        for i in range(self.gpus):
            dev = self.root / "dev" / f"gpu{i}"
            if not dev.exists():
                # Same major/minor as /dev/null: a character device SLURM can bind.
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
            devices.append(str(dev))
        self.conf.write_text(self._slurm_conf(hw), encoding="utf-8")
        self._write_client_wrappers()
        gres = ["AutoDetect=off"]
        gres += [f"NodeName={self.node} Name=gpu File={d}" for d in devices]
        (self.root / "etc" / "gres.conf").write_text("\n".join(gres) + "\n", encoding="utf-8")

    def _write_client_wrappers(self) -> None:
        self.bin_dir.mkdir(exist_ok=True)
        for client in CLIENTS:
            real = shutil.which(client)
            wrapper = self.bin_dir / client
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {real} "$@"\n')
            wrapper.chmod(0o755)

    def _slurm_conf(self, hw: dict[str, str]) -> str:
        r = self.root
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        ctld_port, slurmd_port = free_ports(2)
        lines = [
            f"ClusterName={CLUSTER_NAME}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'state' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'spool' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups, no systemd: plain process tracking, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            # Start a submitted job at once (the default waits up to 3 s); a
            # backfill pass every second, not every 30 s.
            "SchedulerParameters=batch_sched_delay=0,bf_interval=1",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1000",
            f"MinJobAge={MIN_JOB_AGE_S}",
            "ReturnToService=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "GresTypes=gpu",
            (
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={hw['CPUs']}"
                f" Boards={hw['Boards']} SocketsPerBoard={hw['SocketsPerBoard']}"
                f" CoresPerSocket={hw['CoresPerSocket']} ThreadsPerCore={hw['ThreadsPerCore']}"
                f" RealMemory={hw['RealMemory']}{gres} State=UNKNOWN"
            ),
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # munged insists that everyone may reach its socket
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        key.chmod(0o400)
        cmd = [
            "munged",
            "--foreground",
            f"--socket={munge_dir / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={munge_dir / 'munged.pid'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
            f"--log-file={munge_dir / 'munged.log'}",
        ]
        self._spawn("munged", cmd, user="munge")
        socket_path = munge_dir / "munge.socket"
        self._wait_for(socket_path.exists, 20, "munged's socket")

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (kept for the process)
        self.procs[name] = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, user=user, env=self.env()
        )
        out.close()

    def _wait_for(self, ready: callable, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                        + self.logs_tail()
                    )
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"timed out after {timeout_s:.0f} s waiting for {what}:\n" + self.logs_tail()
        )

    def _controller_answers(self) -> bool:
        return self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0

    def _node_idle(self) -> bool:
        state = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()
        return state == "idle"

    # ----- use -----

    def run(
        self, cmd: list[str], check: bool = True, timeout_s: float = 30
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; return its completed process."""
        return subprocess.run(
            cmd, env=self.env(), capture_output=True, text=True, check=check, timeout=timeout_s
        )

    def sbatch(self, *args: str) -> str:
        """Submit with ``sbatch --parsable``; return the job id."""
        out = self.run(["sbatch", "--parsable", *args]).stdout.strip()
        return out.split(";")[0]

    def job_state(self, job_id: str) -> str:
        """The job's state as squeue reports it (COMPLETED, FAILED, RUNNING, ...)."""
        out = self.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], check=False)
        return out.stdout.strip()

    def wait_job_state(self, job_id: str, states: set[str], timeout_s: float = 60) -> str:
        """Poll until the job is in one of ``states`` or has ended; return its state then."""
        active = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", ""}  # "": not yet listed
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.job_state(job_id)
            if state in states or state not in active:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state!r} after {timeout_s} s")
            time.sleep(0.2)

    def wait_job(self, job_id: str, timeout_s: float = 60) -> str:
        """Wait until the job has left the queue's active states; return its final state."""
        return self.wait_job_state(job_id, set(), timeout_s)

    def job_ids(self) -> set[str]:
        """Ids of every job the controller still remembers (within MinJobAge)."""
        out = self.run(["squeue", "-h", "--states=all", "-o", "%i"], check=False).stdout
        return set(out.split())

    def logs_tail(self, chars: int = 3000) -> str:
        """The end of each daemon log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                text = path.read_text(errors="replace")[-chars:]
                parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    def job_record(self, job_id: str) -> dict[str, str]:
        """The controller's record of a job (``scontrol show job``); {} once it forgot it."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id], check=False)
        return parse_job_record(out.stdout) if out.returncode == 0 else {}

    def was_allocated(self, job_id: str) -> bool:
        """Whether SLURM gave the job this cluster's node and started it (asked, not logged)."""
        return was_allocated(self.job_record(job_id), self.node)

    # ----- tear-down -----

    def stop(self, timeout_s: float = 15) -> None:
        """Cancel leftover jobs, then stop slurmd, slurmctld and munged by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", f"--partition={PARTITION}"], check=False)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._jobs_active():
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)

    def _jobs_active(self) -> bool:
        out = self.run(["squeue", "-h", "-o", "%T"], check=False).stdout
        return any(s in out for s in ("RUNNING", "PENDING", "COMPLETING", "CONFIGURING"))

    def remove(self) -> None:
        """Delete the cluster's folder (configuration, state, logs, fake devices)."""
        shutil.rmtree(self.root, ignore_errors=True)
