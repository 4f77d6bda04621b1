"""Every GPU of a node: device lists, exclusive leases that die with their process, and
the same dataset from two simulated devices as from one.

Simulated devices (``cpu:0,cpu:1``) run on the CPU; leases are real ``flock`` files taken by real
threads and processes, killed with SIGKILL where a test says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from imagenet_int8_assets.core.latents.devices import (
    DeviceLeaseTimeout,
    DeviceSettingError,
    gpu_pool_limit,
    lease_device,
    lock_path,
    parse_devices,
    resolve_device,
    select_device,
    torch_device,
    visible_devices,
)
from imagenet_int8_assets_tests.support.builds import REPO, crops

SIM = ["cpu:0", "cpu:1"]


def test_visible_devices_from_the_settings():
    assert visible_devices("cpu:0,cpu:1") == SIM
    assert visible_devices(" cuda:1 , cuda:0 ", cuda_count=2) == ["cuda:1", "cuda:0"]  # order is kept
    assert parse_devices("cpu") == ["cpu"]
    # without IMAGENET_INT8_DEVICES: every GPU for auto and cuda, one for cuda:N, the CPU otherwise
    assert visible_devices(None, "auto", cuda_count=0) == ["cpu"]
    assert visible_devices("", "auto", cuda_count=4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert visible_devices(None, "cuda", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert visible_devices(None, "cuda:1", cuda_count=2) == ["cuda:1"]
    assert visible_devices(None, "cpu", cuda_count=8) == ["cpu"]
    assert visible_devices() == ["cpu"]  # this machine: no GPU
    for setting, device, count, message in [
        ("cuda:0,cuda:1", "auto", 1, "names 'cuda:1' but torch sees 1 GPU"),
        ("cpu:0,cpu:0", "auto", 0, "names 'cpu:0' more than once"),
        ("gpu0", "auto", 0, "unknown device 'gpu0'"),
        (" , ", "auto", 0, "no device"),
        (None, "cuda", 0, "torch sees no CUDA GPU"),
        (None, "cuda:2", 2, "torch sees 2 GPU"),
        (None, "tpu", 0, "Unknown device"),
    ]:
        with pytest.raises(DeviceSettingError, match=message):
            visible_devices(setting, device, cuda_count=count)


def test_one_resolver_decides_the_device_setting_with_the_same_messages():
    """``resolve_device`` (one device: the report's decoder, benchmarks) and ``visible_devices``
    (every device encode runs spread over) read IMAGENET_INT8_DEVICE the same way."""
    assert resolve_device("cpu") == "cpu" and resolve_device("cpu", cuda_count=4) == "cpu"
    assert resolve_device("auto", cuda_count=0) == "cpu"
    assert resolve_device("auto", cuda_count=2) == "cuda" and resolve_device("cuda:1", cuda_count=2) == "cuda:1"
    assert resolve_device("cuda", cuda_count=1) == "cuda"
    for device, count, message in [
        ("tpu", 0, r"Unknown device: IMAGENET_INT8_DEVICE='tpu'; use auto, cpu, cuda or cuda:N\.$"),
        ("cuda", 0, "IMAGENET_INT8_DEVICE='cuda' but torch sees no CUDA GPU"),
        ("cuda:3", 0, "IMAGENET_INT8_DEVICE='cuda:3' but torch sees no CUDA GPU"),
        ("cuda:2", 2, r"IMAGENET_INT8_DEVICE='cuda:2' but torch sees 2 GPU\(s\): use auto, cpu, cuda or cuda:N with N < 2\.$"),
    ]:
        with pytest.raises(DeviceSettingError, match=message) as one:
            resolve_device(device, cuda_count=count)
        with pytest.raises(DeviceSettingError) as every:
            visible_devices(None, device, cuda_count=count)
        assert str(one.value) == str(every.value)


def test_the_gpu_pool_limit_is_the_device_count():
    assert gpu_pool_limit(["cpu"]) == 1
    assert gpu_pool_limit(SIM) == 2
    assert gpu_pool_limit([f"cuda:{i}" for i in range(8)]) == 8
    assert gpu_pool_limit([]) == 1
    assert torch_device("cpu:1") == "cpu" and torch_device("cuda:3") == "cuda:3"
    assert select_device("cpu:1") == "cpu" and select_device("cpu") == "cpu"
    assert lock_path("/o", "cpu:1") == Path("/o/.devices/cpu-1.lock")
    assert lock_path("/o", "cuda:0") == Path("/o/.devices/cuda-0.lock")  # no GPU here: by name


def test_threads_never_share_a_device(tmp_path):
    in_use: set[str] = set()
    used: list[str] = []
    most = [0]
    state = threading.Lock()
    errors: list[BaseException] = []

    def worker():
        try:
            for _ in range(4):
                with lease_device(tmp_path, SIM, timeout_s=30, poll_s=0.01) as device:
                    with state:
                        assert device not in in_use, f"{device} leased twice at once"
                        in_use.add(device)
                        used.append(device)
                        most[0] = max(most[0], len(in_use))
                    time.sleep(0.02)
                    with state:
                        in_use.remove(device)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(used) == 24 and set(used) == set(SIM) and most[0] == 2


INTERVALS = """
import json, sys, time
from imagenet_int8_assets.core.latents.devices import lease_device
out = []
for _ in range(int(sys.argv[3])):
    with lease_device(sys.argv[1], sys.argv[2].split(","), timeout_s=60, poll_s=0.01) as device:
        start = time.monotonic()
        time.sleep(0.03)
        out.append([device, start, time.monotonic()])
print(json.dumps(out))
"""


def test_processes_never_share_a_device(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", INTERVALS, str(tmp_path), ",".join(SIM), "5"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    leases = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        leases += json.loads(out)
    assert len(leases) == 20 and {d for d, _, _ in leases} == set(SIM)
    for device in SIM:  # CLOCK_MONOTONIC is one clock for every process on the machine
        spans = sorted((s, e) for d, s, e in leases if d == device)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans


HOLDER = """
import sys, time
from imagenet_int8_assets.core.latents.devices import lease_device
with lease_device(sys.argv[1], sys.argv[2].split(","), timeout_s=5, purpose="run-" + sys.argv[3]) as device:
    print(device, flush=True)
    time.sleep(600)
"""


def _holder(output: Path, tag: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(output), ",".join(SIM), tag], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_a_killed_process_frees_its_lease_and_a_full_house_times_out_naming_the_holders(tmp_path):
    (first, first_device), (second, second_device) = _holder(tmp_path, "a"), _holder(tmp_path, "b")
    try:
        assert {first_device, second_device} == set(SIM)
        started = time.monotonic()
        with pytest.raises(DeviceLeaseTimeout) as info:
            with lease_device(tmp_path, SIM, timeout_s=0.5, log=lambda _: None):
                pass
        assert 0.5 <= time.monotonic() - started < 5
        message = str(info.value)
        assert "All 2 device(s)" in message and "stayed leased" in message
        assert f"pid {first.pid}" in message and f"pid {second.pid}" in message
        assert "dagster instance concurrency set gpu 2" in message
        os.kill(first.pid, signal.SIGKILL)  # no cleanup code runs in the holder
        first.wait(10)
        assert lock_path(tmp_path, first_device).exists()  # the stale file blocks nobody
        started = time.monotonic()
        with lease_device(tmp_path, SIM, timeout_s=5) as device:
            assert device == first_device
            record = json.loads(lock_path(tmp_path, device).read_text())
            assert record["pid"] == os.getpid() and record["device"] == device
        assert time.monotonic() - started < 2
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_when_all_devices_are_taken_a_lease_waits_then_gets_the_freed_one(tmp_path):
    messages: list[str] = []
    got: dict = {}

    def waiter():
        started = time.monotonic()
        with lease_device(tmp_path, SIM, timeout_s=20, log=messages.append, poll_s=0.02) as device:
            got.update(device=device, waited=time.monotonic() - started)

    with lease_device(tmp_path, SIM, purpose="first") as a:
        with lease_device(tmp_path, SIM, purpose="second") as b:
            assert (a, b) == ("cpu:0", "cpu:1")  # first free in list order
            thread = threading.Thread(target=waiter)
            thread.start()
            time.sleep(0.5)
            assert not got
        # cpu:1 is free again
        thread.join(10)
    assert got["device"] == "cpu:1" and got["waited"] >= 0.45
    assert any("All 2 device(s) are leased" in m and "waiting up to" in m for m in messages), messages


ENCODE = """
import numpy as np
from imagenet_int8_assets.core.latents.devices import select_device, torch_device
from imagenet_int8_assets.core.latents.encode import encode_posterior, select_latent
from imagenet_int8_assets.core.latents.quantize import quantize
from imagenet_int8_assets.core.latents.vae import load_vae

def encode_classes(output, work, device, names):
    # what a batched encode run does on its leased device: each class's latents and uint8 codes
    vae = load_vae("tiny-random").to(select_device(device))
    for name in names:
        images = np.load(output / f"{name}.npy")
        ids = [f"{name}/{i}.JPEG" for i in range(len(images))]
        post = encode_posterior(vae, images, torch_device(device), batch_size=4)
        latent = select_latent(post.mean, post.std, ids, "sample", 0)
        np.savez(work / f"{name}.npz", mean=post.mean, std=post.std, latent=latent, codes=quantize(latent))
"""

WORKER = ENCODE + """
import json, os, sys, time
from pathlib import Path
from imagenet_int8_assets.core.latents.devices import lease_device

def meet(barrier, device, parties):
    # every party holds its lease at once: they hold distinct devices
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / str(os.getpid())).write_text(device)
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < parties:
        assert time.monotonic() < deadline, "the other encode never got a device"
        time.sleep(0.05)

if __name__ == "__main__":
    output, work, devices = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
    with lease_device(output, devices, timeout_s=120) as device:
        meet(work / "leased", device, 2)
        encode_classes(output, work, device, sys.argv[4:])
    print(json.dumps({"device": device}))
"""


@pytest.mark.slow
def test_two_devices_build_the_same_latents_as_one(tmp_path):
    """Two runs at once, in two processes (a worker and this one), one class each on its own
    simulated device, give the bytes of one run encoding both classes on one device."""
    output, two, one = tmp_path / "out", tmp_path / "two", tmp_path / "one"
    for folder in (output, two, one):
        folder.mkdir()
    classes = {"n0001": crops(3, seed=0), "n0002": crops(2, seed=10)}
    for name, images in classes.items():
        np.save(output / f"{name}.npy", images)
    code: dict = {"__name__": "worker"}
    exec(WORKER, code)  # the worker's functions, in this process
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(output), str(two), ",".join(SIM), "n0002"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with lease_device(output, SIM, timeout_s=120) as here:
            code["meet"](two / "leased", here, 2)
            code["encode_classes"](output, two, here, ["n0001"])
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err[-3000:]
    assert sorted([here, json.loads(out.strip().splitlines()[-1])["device"]]) == SIM
    with lease_device(output, ["cpu:0"], timeout_s=10) as device:
        code["encode_classes"](output, one, device, list(classes))
    for name in classes:
        a, b = np.load(two / f"{name}.npz"), np.load(one / f"{name}.npz")
        for key in ("mean", "std", "latent", "codes"):
            assert a[key].tobytes() == b[key].tobytes(), (name, key)


def test_the_instance_gpu_pool_follows_the_device_count(tmp_path, monkeypatch):
    """prepare_dagster_home (the one test here that imports Dagster, through instance.py)."""
    from dagster import DagsterInstance

    from imagenet_int8_assets.build.instance import GPU_POOL, GPU_POOL_RECORD, prepare_dagster_home

    def limit(home: Path) -> int:
        with DagsterInstance.get() as instance:
            return instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count

    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("IMAGENET_INT8_DEVICES", "cpu:0,cpu:1")
    prepare_dagster_home(home)
    assert limit(home) == 2 and json.loads((home / GPU_POOL_RECORD).read_text()) == {"limit": 2}
    monkeypatch.delenv("IMAGENET_INT8_DEVICES")
    prepare_dagster_home(home)  # a CPU-only machine: one device
    assert limit(home) == 1
    prepare_dagster_home(home, devices=[f"cuda:{i}" for i in range(4)])
    assert limit(home) == 4
    with DagsterInstance.get() as instance:  # the user's own limit is left alone
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 3)
    prepare_dagster_home(home, devices=SIM)
    assert limit(home) == 3
    monkeypatch.setenv("IMAGENET_INT8_DEVICES", "bogus")  # invalid settings: reported elsewhere; limit 1
    legacy = tmp_path / "legacy"
    monkeypatch.setenv("DAGSTER_HOME", str(legacy))
    prepare_dagster_home(legacy)
    assert limit(legacy) == 1
    (legacy / GPU_POOL_RECORD).unlink()  # a home prepared before the record: its fixed 1 is ours
    prepare_dagster_home(legacy, devices=SIM)
    assert limit(legacy) == 2
