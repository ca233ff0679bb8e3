"""GPU claiming: disjoint devices for concurrent jobs, no stale locks, SLURM passthrough."""

import multiprocessing as mp
import os
import signal
import time

import pytest

from imgpipe.gpus import claim_devices

CTX = mp.get_context("fork")


@pytest.fixture(autouse=True)
def no_gpu_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def _hold(lock_dir, total, n, hold_s, results):
    # Each job is its own process started by Snakemake: it does not inherit another's claim.
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-5.lock"]


def test_slurm_allocation_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with claim_devices(1, lock_dir=tmp_path, total=8) as devices:
        assert devices == ["3"]
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
