"""One build per output: an OS lock that dies with its process, and pid-reuse-safe process identity.

``hold_build_lock(output)`` takes ``fcntl.flock`` on ``<output>/.imagenet-int8-build.lock`` without
waiting and writes who holds it (host, pid, process start, wall-clock start, command line) into the
file, so a second build is refused with a message naming the running one. The kernel releases the
lock when the holder's process dies, however it dies (kill -9 included), so a stale lock file never
blocks anyone; the file itself is left in place (deleting lock files races with their next user).

``share_build_lock(output)`` is what Dagster runs that write to the output hold (the UI,
`dagster asset materialize`, automation): the same lock in shared mode, so those runs go on side by
side while no build does, and a build is refused while any of them writes (and they while a build
does). A build's own runs hold nothing themselves: the build holds the lock for them
(``BUILD_LOCK_VAR`` in their environment names the output).

``hold_init_lock(folder)`` is the waiting kind, for short critical sections that several processes
may need in turn (first initialization of a shared DAGSTER_HOME).

``process_identity()`` / ``process_is_alive()`` identify a process by host, pid and a start token
(boot id and start time in clock ticks from ``/proc/<pid>/stat`` on Linux), so a pid reused by a
later process is not mistaken for the one recorded. Elsewhere the token is empty and a pid that
exists counts as alive.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

BUILD_LOCK_NAME = ".imagenet-int8-build.lock"
# set by `imagenet-int8 build` for its own runs (in its process and its run processes): the output
# whose build lock it holds, so those runs do not try to share the lock the build holds exclusively
BUILD_LOCK_VAR = "IMAGENET_INT8_BUILD_LOCK_HELD"
INIT_LOCK_NAME = ".imagenet-int8-init.lock"


class BuildLockBusy(RuntimeError):
    """Another live process holds the build lock of this output."""


class BuildLockError(RuntimeError):
    """The lock file cannot be created or locked (unwritable output, unsupported filesystem)."""


def build_lock_path(output: str | os.PathLike) -> Path:
    return Path(output) / BUILD_LOCK_NAME


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start_token(pid: int) -> str:
    """``<boot id>/<start time in clock ticks>`` of ``pid`` on Linux; "" where /proc is unavailable.

    Raises ProcessLookupError when /proc exists but has no such process.
    """
    if not Path("/proc/self/stat").exists():
        return ""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    # the command name (field 2) may hold spaces and parentheses: fields restart after the last ")"
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{_boot_id()}/{fields[19]}"  # field 22, starttime


def current_host() -> str:
    return socket.gethostname()


def process_identity() -> dict[str, str | int]:
    """Who this process is: host, pid, start token, start time (UTC) and command line."""
    return {
        "host": current_host(),
        "pid": os.getpid(),
        "start_token": process_start_token(os.getpid()),
        "started_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join([Path(sys.argv[0]).name or sys.executable, *sys.argv[1:]]),
    }


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def process_is_alive(pid: int, start_token: str) -> bool:
    """Whether the process recorded as (``pid``, ``start_token``) on this host still runs.

    A zombie (killed, not yet reaped by its parent) counts as dead: it runs no code.
    """
    if pid <= 0:
        return False
    try:
        token = process_start_token(pid)
    except ProcessLookupError:
        return False
    if not token:  # no /proc: the best available answer
        return _pid_exists(pid)
    if token != start_token:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise BuildLockError(
            f"cannot create the lock file {path}: {exc.strerror or exc}; "
            "make its folder writable or choose another location"
        ) from exc


def _read_holder(fd: int, attempts: int = 20) -> dict:
    """The holder's record; it may not be written yet just after the holder took the lock."""
    for _ in range(attempts):
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16)
        try:
            holder = json.loads(data)
            if isinstance(holder, dict):
                return holder
        except ValueError:
            pass
        time.sleep(0.05)
    return {}


def try_lock(fd: int, path: Path) -> bool:
    """Take the exclusive flock of ``fd`` (opened on ``path``) without waiting: False when another
    open file holds it. BuildLockError when the filesystem cannot lock.

    flock locks belong to an open file, not to a process: two threads of one process that open the
    file separately exclude each other, and closing a descriptor that does not hold the lock
    releases nothing.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise BuildLockError(
            f"cannot lock {path}: {exc.strerror or exc}; put it on a filesystem that supports file locks (flock)"
        ) from exc
    return True


def write_holder(fd: int, record: dict) -> None:
    """Replace the lock file's contents with ``record`` (JSON): who holds it, for the next one."""
    data = json.dumps(record, indent=1).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


# public names of the helpers other locks (core.latents.devices) reuse
open_lock_file = _open_lock_file
read_holder = _read_holder


def describe_holder(holder: dict) -> str:
    if not holder:
        return "a process that has not written its details yet"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started_at', '?')}, "
        f"command: {holder.get('command', '?')}"
    )


def _held_shared_only(path: Path) -> bool:
    """Whether the lock at ``path`` is held only in shared mode (Dagster runs), not by a build."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@contextmanager
def hold_build_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold the build lock of ``output`` for the duration, or raise BuildLockBusy at once: while
    another build holds it, or while Dagster runs (``share_build_lock``) write to the output."""
    path = build_lock_path(output)
    fd = _open_lock_file(path)
    try:
        if not try_lock(fd, path):
            if _held_shared_only(path):
                raise BuildLockBusy(
                    f"Dagster runs (launched from the UI, `dagster asset materialize` or automation) are writing to "
                    f"the output {Path(output)} (lock file {path}). Wait for them to finish (the UI's Runs page) or "
                    "cancel them, then run this command again."
                )
            holder = _read_holder(fd)
            raise BuildLockBusy(
                f"another build is already running on the output {Path(output)}: {describe_holder(holder)} "
                f"(lock file {path}). Wait for it to finish or stop it, then run this command again; "
                "the lock is released when that process ends, even if it is killed."
            )
        write_holder(fd, process_identity())
        yield path
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


@contextmanager
def share_build_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold the build lock of ``output`` in shared mode for the duration: what a Dagster run that
    writes to the output holds (runs from the UI, `dagster asset materialize` and automation share
    it with one another), so that no `imagenet-int8 build` (the exclusive holder) runs at the same
    time. Raises BuildLockBusy at once, naming the build, while one holds it."""
    path = build_lock_path(output)
    fd = _open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BuildLockError(
                    f"cannot lock {path}: {exc.strerror or exc}; put the output on a filesystem that supports "
                    "file locks (flock)"
                ) from exc
            raise BuildLockBusy(
                f"`imagenet-int8 build` is building the output {Path(output)}: {describe_holder(_read_holder(fd))} "
                f"(lock file {path}). This run would write to the same files; launch it again once that build has "
                "ended (the lock is released when its process ends, even if it is killed)."
            ) from None
        yield path
    finally:
        os.close(fd)


@contextmanager
def hold_init_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock under ``folder``, waiting for other holders to finish."""
    path = Path(folder) / INIT_LOCK_NAME
    fd = _open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise BuildLockError(
                f"cannot lock {path}: {exc.strerror or exc}; put it on a filesystem that supports "
                "file locks (flock)"
            ) from exc
        yield path
    finally:
        os.close(fd)
