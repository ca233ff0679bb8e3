"""GPU claiming: disjoint devices for concurrent jobs (also inside one SLURM allocation),
no stale locks, one GPU held by inference."""

import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import types

import pytest

from imgpipe.learn import gpus
from imgpipe.learn.gpus import claim_devices, claim_for_inference

CTX = mp.get_context("fork")


@pytest.fixture(autouse=True)
def no_gpu_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(gpus, "_cuda_devices", None)


def _hold(lock_dir, total, n, hold_s, results, env=None):
    # Each job is its own process started by Snakemake: it does not inherit another's claim.
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ.update(env or {})
    with claim_devices(n, lock_dir=lock_dir, total=total, poll_s=0.02) as devices:
        start = time.monotonic()
        results.put(("claimed", tuple(devices), os.environ["CUDA_VISIBLE_DEVICES"]))
        time.sleep(hold_s)
        results.put((tuple(devices), start, time.monotonic()))


def test_claims_free_devices_and_restores_env(tmp_path):
    results = CTX.Queue()
    with claim_devices(2, lock_dir=tmp_path, total=4) as first:
        assert first == ["0", "1"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        other = CTX.Process(target=_hold, args=(tmp_path, 4, 2, 0.0, results))
        other.start()
        assert results.get(timeout=30) == ("claimed", ("2", "3"), "2,3")
        other.join(timeout=30)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with claim_devices(4, lock_dir=tmp_path, total=4) as everything:
        assert everything == ["0", "1", "2", "3"]


def test_no_gpus_or_zero_requested_claims_nothing(tmp_path):
    with claim_devices(1, lock_dir=tmp_path, total=0) as devices:
        assert devices == []
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with claim_devices(0, lock_dir=tmp_path, total=2) as devices:
        assert devices == []
    assert not list(tmp_path.iterdir())


def test_more_than_the_machine_has_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="asked for 3 GPUs"):
        with claim_devices(3, lock_dir=tmp_path, total=2):
            pass


def test_visible_devices_limit_the_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with claim_devices(1, lock_dir=tmp_path, total=8) as devices:
        assert devices == ["5"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"
    locks = tmp_path / socket.gethostname()
    assert sorted(p.name for p in locks.iterdir()) == ["gpu-5.lock"]


@pytest.mark.parametrize("disabled", ["", "-1", "NoDevFiles", "-1,0"])
def test_cuda_disabled_leaves_nothing_to_claim(tmp_path, monkeypatch, disabled):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", disabled)
    with claim_devices(1, lock_dir=tmp_path, total=2) as devices:
        assert devices == []
        assert os.environ["CUDA_VISIBLE_DEVICES"] == disabled
    with claim_for_inference(lock_dir=tmp_path, total=2) as device:
        assert device == "cpu"
    assert not list(tmp_path.iterdir())


def test_concurrent_holders_never_share_a_device(tmp_path):
    results = CTX.Queue()
    workers = [
        CTX.Process(target=_hold, args=(tmp_path, 3, 1 + i % 2, 0.05, results)) for i in range(8)
    ]
    for worker in workers:
        worker.start()
    messages = [results.get(timeout=60) for _ in range(2 * len(workers))]
    spans = [m for m in messages if m[0] != "claimed"]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert len(spans) == 8
    for i, (devices_a, start_a, end_a) in enumerate(spans):
        assert len(devices_a) == len(set(devices_a))
        for devices_b, start_b, end_b in spans[i + 1 :]:
            overlap_in_time = start_a < end_b and start_b < end_a
            assert not (overlap_in_time and set(devices_a) & set(devices_b))


def _hold_forever(lock_dir, ready):
    with claim_devices(2, lock_dir=lock_dir, total=2):
        ready.set()
        time.sleep(600)


def test_killed_holder_frees_its_devices(tmp_path):
    ready = CTX.Event()
    holder = CTX.Process(target=_hold_forever, args=(tmp_path, ready))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(TimeoutError):
        with claim_devices(1, lock_dir=tmp_path, total=2, poll_s=0.05, timeout_s=0.3):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(timeout=30)
    with claim_devices(2, lock_dir=tmp_path, total=2, poll_s=0.05, timeout_s=10) as devices:
        assert devices == ["0", "1"]


def test_waiting_job_gets_the_device_once_released(tmp_path):
    results = CTX.Queue()
    holder = CTX.Process(target=_hold, args=(tmp_path, 1, 1, 0.5, results))
    holder.start()
    assert results.get(timeout=30)[0] == "claimed"
    start = time.monotonic()
    with claim_devices(1, lock_dir=tmp_path, total=1, poll_s=0.02, timeout_s=30) as devices:
        waited = time.monotonic() - start
        assert devices == ["0"]
    _, _, released = results.get(timeout=30)
    holder.join(timeout=30)
    assert waited > 0.2
    assert released <= start + waited + 0.05


# ----- issue 11 point 9: GPU claiming inside a SLURM allocation -----


def test_jobs_in_one_slurm_allocation_claim_distinct_gpus(tmp_path, monkeypatch):
    """Jobs of one salloc (local executor) share SLURM_JOB_ID: they split the allocation's GPUs."""
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    allocation = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "3,5"}
    results = CTX.Queue()
    jobs = [
        CTX.Process(target=_hold, args=(tmp_path, 8, 1, 0.5, results, allocation)) for _ in range(2)
    ]
    for job in jobs:
        job.start()
    claimed = [results.get(timeout=30) for _ in jobs]
    assert sorted(m[1] for m in claimed) == [("3",), ("5",)]
    assert sorted(m[2] for m in claimed) == ["3", "5"]
    # Both of the allocation's GPUs are held: a third job waits (8 on the machine or not).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(TimeoutError):
        with claim_devices(1, lock_dir=tmp_path, total=8, poll_s=0.02, timeout_s=0.1):
            pass
    for job in jobs:
        job.join(timeout=30)
        assert job.exitcode == 0
    locks = tmp_path / f"{socket.gethostname()}-42"
    assert sorted(p.name for p in locks.iterdir()) == ["gpu-3.lock", "gpu-5.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [locks.name]


@pytest.mark.parametrize(
    ("other_host", "other_job"),
    [("node-a", "43"), ("node-b", "42"), ("node-b", None)],
    ids=["other-slurm-job", "other-node-same-job-id", "other-node-no-slurm"],
)
def test_other_slurm_jobs_and_nodes_do_not_contend(tmp_path, monkeypatch, other_host, other_job):
    """GPU 0 of job 42 on node-a and GPU 0 of another job or node are different claims."""
    hostname = {"name": "node-a"}
    monkeypatch.setattr(socket, "gethostname", lambda: hostname["name"])
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with claim_devices(1, lock_dir=tmp_path, poll_s=0.02, timeout_s=0) as mine:
        assert mine == ["0"]
        # The same job on the same node contends (a second open file description, like a process).
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        with pytest.raises(TimeoutError):
            with claim_devices(1, lock_dir=tmp_path, poll_s=0.02, timeout_s=0):
                pass
        hostname["name"] = other_host
        if other_job is None:
            monkeypatch.delenv("SLURM_JOB_ID")
        else:
            monkeypatch.setenv("SLURM_JOB_ID", other_job)
        with claim_devices(1, lock_dir=tmp_path, poll_s=0.02, timeout_s=0) as theirs:
            assert theirs == ["0"]
    namespaces = {"node-a-42", other_host + (f"-{other_job}" if other_job else "")}
    assert {p.name for p in tmp_path.iterdir()} == namespaces


def test_more_gpus_than_the_allocation_gives_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    message = r"asked for 3 GPUs but SLURM job 42 sees only 2 \(CUDA_VISIBLE_DEVICES=0,1\)"
    with pytest.raises(ValueError, match=message):
        with claim_devices(3, lock_dir=tmp_path, total=8):
            pass
    assert not list(tmp_path.iterdir())


# ----- claim_for_inference -----


@pytest.fixture
def fake_torch(monkeypatch):
    """A stand-in torch module: CUDA available or not, initialised or not (no GPU needed)."""
    state = types.SimpleNamespace(available=True, initialised=False)
    cuda = types.SimpleNamespace(
        is_available=lambda: state.available, is_initialized=lambda: state.initialised
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    return state


def test_inference_without_gpus_runs_on_cpu_and_claims_nothing(tmp_path, monkeypatch):
    with claim_for_inference(lock_dir=tmp_path, total=0) as device:
        assert device == "cpu"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    # SLURM's GPUs without a driver on the node (the test cluster's fake GPUs): still the CPU.
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with claim_for_inference(lock_dir=tmp_path, total=0) as device:
        assert device == "cpu"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert not list(tmp_path.iterdir())


def test_inference_holds_one_gpu_for_the_block(tmp_path, fake_torch, monkeypatch):
    with claim_for_inference(lock_dir=tmp_path, total=2, poll_s=0.02) as device:
        assert device == "cuda"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # another job's environment
        with claim_devices(1, lock_dir=tmp_path, total=2, poll_s=0.02, timeout_s=0) as other:
            assert other == ["1"]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with claim_devices(2, lock_dir=tmp_path, total=2, poll_s=0.02, timeout_s=0) as both:
        assert both == ["0", "1"]


def test_inference_without_usable_cuda_drops_its_claim(tmp_path, fake_torch):
    fake_torch.available = False  # e.g. a CPU-only torch on a GPU machine
    with claim_for_inference(lock_dir=tmp_path, total=2, poll_s=0.02) as device:
        assert device == "cpu"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
        with claim_devices(2, lock_dir=tmp_path, total=2, poll_s=0.02, timeout_s=0) as both:
            assert both == ["0", "1"]


def test_inference_after_training_waits_for_the_gpu_cuda_started_on(
    tmp_path, fake_torch, monkeypatch
):
    """CUDA reads CUDA_VISIBLE_DEVICES once: a cv fold predicts on the GPU it trained on."""

    def claim():  # a claim from this job's environment (CUDA_VISIBLE_DEVICES unset)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        return claim_devices(1, lock_dir=tmp_path, total=2, poll_s=0.02)

    with claim() as busy:
        assert busy == ["0"]
        with claim() as training:
            assert training == ["1"]
            fake_torch.initialised = True  # the training used the GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with claim_devices(1, lock_dir=tmp_path, poll_s=0.02) as someone_else:
        assert someone_else == ["1"]
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        with pytest.raises(TimeoutError):  # GPU 0 is free, but this process's CUDA is on 1
            with claim_for_inference(lock_dir=tmp_path, total=2, poll_s=0.02, timeout_s=0.1):
                pass
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with claim_for_inference(lock_dir=tmp_path, total=2, poll_s=0.02) as device:
        assert device == "cuda"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
