"""Every GPU of a node: which devices an encode may use, and an exclusive lease on one of them.

``resolve_device(device)`` decides what ``IMAGENET_INT8_DEVICE`` means (the one device a
single-device step such as the report's decoder uses, and the checks and messages for a bad
name or a GPU torch cannot see); ``visible_devices(setting, device)`` lists the devices encode
runs may spread over: the names in
``IMAGENET_INT8_DEVICES`` (``cuda:0,cuda:1``; for tests ``cpu:0,cpu:1``, simulated devices that
run on the CPU) or, without it, every GPU torch sees (``IMAGENET_INT8_DEVICE`` auto or cuda), the
one GPU named by cuda:N, or the CPU.

``lease_device(output, devices, timeout_s)`` holds one of them exclusively while an encode step
runs: ``fcntl.flock`` on ``<output>/.devices/<device>.lock`` (the build lock's helpers, see
``core.common.build_lock``), so the lease dies with its process however it ends, kill -9 included. A
step takes the first free device in list order; when all are leased it waits, polling, for at
most ``timeout_s`` and then fails with a message naming each holder. With the Dagster ``gpu`` pool
limited to ``gpu_pool_limit(devices)`` = the number of devices, N runs encode at once, each on its
own device: the backfill splits the classes across runs (each class is encoded by exactly one
run), the lease only picks where. On the CPU the result is bit-identical on any simulated
device (the encode of one image does not depend on the batch or the threads: docs/GUARANTEES.md,
"Reproducibility").

torch is imported only to count GPUs (``visible_devices``) and to name a CUDA device's lock by
its UUID (so two processes with different CUDA_VISIBLE_DEVICES still exclude each other).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from imagenet_int8_assets.core.common.build_lock import (
    describe_holder,
    open_lock_file,
    process_identity,
    read_holder,
    try_lock,
    write_holder,
)

DEVICES_DIR = ".devices"
DEFAULT_LEASE_TIMEOUT_S = 3600.0
POLL_S = 0.05  # a handoff between runs costs at most this (a poll is an open and a flock per device)
WAIT_LOG_EVERY_S = 60.0
_DEVICE = re.compile(r"cpu(:[0-9]+)?|cuda:[0-9]+")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE_SETTING = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


class DeviceSettingError(ValueError):
    """The device list is malformed, or names a GPU torch cannot see."""


class DeviceLeaseTimeout(RuntimeError):
    """Every device stayed leased by other processes for the whole wait (not an OSError: no disk
    or network handler may mistake it for theirs)."""


def parse_devices(setting: str) -> list[str]:
    """``"cuda:0, cuda:1"`` -> ``["cuda:0", "cuda:1"]``; names must be cuda:N, cpu or cpu:N, once each."""
    names = [n.strip() for n in setting.split(",") if n.strip()]
    bad = [n for n in names if not _DEVICE.fullmatch(n)]
    if bad or not names:
        raise DeviceSettingError(
            f"IMAGENET_INT8_DEVICES={setting!r}: {'unknown device ' + repr(bad[0]) if bad else 'no device'}; "
            "use a comma-separated list of cuda:N (or cpu:N, simulated devices on the CPU, for tests), "
            "e.g. cuda:0,cuda:1, or leave it empty for every GPU torch sees"
        )
    duplicate = sorted({n for n in names if names.count(n) > 1})
    if duplicate:
        raise DeviceSettingError(f"IMAGENET_INT8_DEVICES={setting!r} names {duplicate[0]!r} more than once")
    return names


def cuda_device_count() -> int:
    """The GPUs torch sees (0 without CUDA). Does not initialize CUDA."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def check_device_name(device: str) -> None:
    """Refuse an ``IMAGENET_INT8_DEVICE`` that is none of auto, cpu, cuda, cuda:N (no torch import)."""
    if not isinstance(device, str) or not _DEVICE_SETTING.fullmatch(device):
        raise DeviceSettingError(f"Unknown device: IMAGENET_INT8_DEVICE={device!r}; use {DEVICE_CHOICES}.")


def resolve_device(device: str, cuda_count: int | None = None) -> str:
    """What ``IMAGENET_INT8_DEVICE`` names, for a step that runs on one device: ``auto`` ->
    ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as they are.
    Raises ``DeviceSettingError`` for an unknown name, a GPU name without a GPU, or ``cuda:N``
    beyond the GPUs torch sees. ``cuda_count`` overrides ``torch.cuda.device_count()`` (tests)."""
    check_device_name(device)
    if device == "cpu":
        return device
    count = cuda_device_count() if cuda_count is None else cuda_count
    if device == "auto":
        return "cuda" if count else "cpu"
    if count == 0:
        raise DeviceSettingError(
            f"IMAGENET_INT8_DEVICE={device!r} but torch sees no CUDA GPU. Use IMAGENET_INT8_DEVICE=auto "
            "(GPU when present, else CPU) or cpu."
        )
    if int(device.partition(":")[2] or 0) >= count:
        raise DeviceSettingError(
            f"IMAGENET_INT8_DEVICE={device!r} but torch sees {count} GPU(s): use {DEVICE_CHOICES} with N < {count}."
        )
    return device


def visible_devices(setting: str | None = None, device: str = "auto", cuda_count: int | None = None) -> list[str]:
    """The devices encode runs spread over, one run per device.

    ``setting`` (``IMAGENET_INT8_DEVICES``), when not empty, is the list itself: each ``cuda:N``
    must be a GPU torch sees. Without it, from ``device`` (``IMAGENET_INT8_DEVICE``): ``auto`` ->
    every GPU (``cuda:0`` .. ``cuda:K-1``), or ``["cpu"]`` without one; ``cuda`` -> every GPU (an
    error without one); ``cuda:N`` -> that GPU only; ``cpu`` -> ``["cpu"]``. ``cuda_count``
    overrides ``torch.cuda.device_count()`` (tests).
    """
    setting = (setting or "").strip()
    if setting:
        names = parse_devices(setting)
        if any(n.startswith("cuda") for n in names):
            count = cuda_device_count() if cuda_count is None else cuda_count
            missing = [n for n in names if n.startswith("cuda") and int(n.split(":")[1]) >= count]
            if missing and not count:
                raise DeviceSettingError(
                    f"IMAGENET_INT8_DEVICES={setting!r} names {missing[0]!r} but torch sees no CUDA GPU on this "
                    "machine: leave IMAGENET_INT8_DEVICES empty (the CPU encodes), or run on a machine with that GPU"
                )
            if missing:
                raise DeviceSettingError(
                    f"IMAGENET_INT8_DEVICES={setting!r} names {missing[0]!r} but torch sees {count} GPU(s) "
                    f"(cuda:0 to cuda:{count - 1}): name those, or leave it empty for every GPU"
                )
        return names
    count = cuda_device_count() if cuda_count is None else cuda_count
    device = resolve_device((device or "auto").strip(), cuda_count=count)
    if device == "cpu" or ":" in device:
        return [device]
    return [f"cuda:{i}" for i in range(count)]  # auto or cuda with GPUs: every one


def gpu_pool_limit(devices: Sequence[str]) -> int:
    """The Dagster ``gpu`` pool limit for ``devices``: one encode run per device, at least one."""
    return max(1, len(set(devices)))


def torch_device(name: str) -> str:
    """What to hand to torch for a leased name: a simulated ``cpu:N`` is the CPU."""
    return "cpu" if name.startswith("cpu") else name


def select_device(name: str) -> str:
    """Make a leased GPU this process's current CUDA device, and return ``torch_device(name)``.

    Without it, calls that take no device (``torch.cuda.empty_cache``, ``synchronize``, library
    handles) act on cuda:0 and create a context there: with N runs on N GPUs, cuda:0 would carry N
    contexts (hundreds of MiB each). Call it right after leasing, before loading the VAE.
    """
    if name.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(name))
    return torch_device(name)


def devices_dir(output: str | os.PathLike) -> Path:
    return Path(output) / DEVICES_DIR


def _cuda_uuid(name: str) -> str | None:
    """The GPU's UUID, the same in every process whatever its CUDA_VISIBLE_DEVICES; None if unknown."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = str(torch.cuda.get_device_properties(int(name.split(":")[1])).uuid)
    except Exception:  # an old driver, a device that vanished: the name is the best we have
        return None
    return re.sub(r"[^A-Za-z0-9-]", "", uuid) or None


def lock_path(output: str | os.PathLike, name: str) -> Path:
    """``<output>/.devices/<device>.lock``: ``cuda-<GPU uuid>.lock`` for a GPU, ``cpu-1.lock`` for cpu:1."""
    key = (_cuda_uuid(name) if name.startswith("cuda") else None) or name.replace(":", "-")
    if name.startswith("cuda") and not key.startswith("cuda"):
        key = f"cuda-{key}"
    return devices_dir(output) / f"{key}.lock"


def _holders(output: str | os.PathLike, devices: Sequence[str]) -> str:
    lines = []
    for name in devices:
        path = lock_path(output, name)
        try:
            fd = open_lock_file(path)
        except Exception:
            lines.append(f"{name}: unknown (cannot open {path})")
            continue
        try:
            lines.append(f"{name}: {describe_holder(read_holder(fd, attempts=3))}")
        finally:
            os.close(fd)
    return "; ".join(lines)


@contextmanager
def lease_device(
    output: str | os.PathLike,
    devices: Sequence[str],
    timeout_s: float = DEFAULT_LEASE_TIMEOUT_S,
    purpose: str = "",
    log: Callable[[str], None] | None = None,
    poll_s: float = POLL_S,
) -> Iterator[str]:
    """Hold one of ``devices`` exclusively for the block; yields its name (pass ``torch_device(name)``
    to torch).

    Takes the first device in order that no other open lease holds. When all are held, waits
    (checking every ``poll_s``, telling ``log`` when it starts waiting and every minute) for at
    most ``timeout_s`` seconds, then raises ``DeviceLeaseTimeout`` naming each holder. The lease is
    released when the block ends, or when the process dies, however it dies. ``purpose`` (e.g. the
    run id) is recorded in the lock file next to the holder's pid, host and command line.
    """
    devices = list(devices)
    if not devices:
        raise DeviceSettingError("no device to lease: the device list is empty")
    if len(set(devices)) != len(devices):
        raise DeviceSettingError(f"the device list {devices} names a device more than once")
    log = log or logging.getLogger(__name__).info
    started = time.monotonic()
    deadline = started + max(0.0, timeout_s)
    next_log = started
    paths = {name: lock_path(output, name) for name in devices}
    while True:
        for name in devices:
            fd = open_lock_file(paths[name])
            if not try_lock(fd, paths[name]):
                os.close(fd)  # flock: closing a descriptor that does not hold the lock releases nothing
                continue
            try:
                waited = time.monotonic() - started
                write_holder(
                    fd,
                    {
                        **process_identity(),
                        "device": name,
                        "purpose": purpose,
                        "leased_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                    },
                )
                if waited >= 1.0:
                    log(f"Leased device {name} after waiting {waited:.0f}s")
                yield name
            finally:
                os.close(fd)  # the only descriptor on this open file: the flock goes with it
            return
        now = time.monotonic()
        if now >= deadline:
            raise DeviceLeaseTimeout(
                f"All {len(devices)} device(s) under {devices_dir(output)} stayed leased by other encode "
                f"runs for {timeout_s:.0f}s: {_holders(output, devices)}. More runs are encoding than there "
                "are devices: lower the Dagster 'gpu' pool limit to the number of devices "
                f"({gpu_pool_limit(devices)}; `dagster instance concurrency set gpu {gpu_pool_limit(devices)}`), "
                "wait for those runs, or stop them; a lease is released when its process ends, even if it is killed."
            )
        if now >= next_log:
            log(
                f"All {len(devices)} device(s) are leased ({_holders(output, devices)}); waiting up to "
                f"{deadline - now:.0f}s more for one"
            )
            next_log = now + WAIT_LOG_EVERY_S
        time.sleep(min(poll_s, max(0.0, deadline - now)))
