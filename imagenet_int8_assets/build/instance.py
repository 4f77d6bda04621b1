"""The Dagster instance the CLI (and anyone following the README) records runs in."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from imagenet_int8_assets.core.common.build_lock import hold_init_lock

SHIPPED_DAGSTER_YAML = Path(__file__).parents[1] / "dagster.yaml"
# the same settings with the instance's storage in PostgreSQL (connection from DAGSTER_PG_*)
SHIPPED_POSTGRES_YAML = Path(__file__).parents[1] / "dagster-postgres.yaml"
POSTGRES_VARS = ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_HOST", "DAGSTER_PG_DB", "DAGSTER_PG_PORT")
GPU_POOL = "gpu"
# the gpu pool limit this code last wrote into the instance: a different limit was set by the user
GPU_POOL_RECORD = ".imagenet-int8-gpu-pool.json"


def dagster_home_path(default_home: str | os.PathLike) -> Path:
    """The DAGSTER_HOME the CLI uses: the variable when set, else ``default_home``."""
    return Path(os.environ.get("DAGSTER_HOME") or default_home).expanduser().resolve()


def default_gpu_pool_limit() -> int:
    """One encode run per device: the devices of IMAGENET_INT8_DEVICES, else every GPU torch sees
    (as IMAGENET_INT8_DEVICE allows), 1 on a CPU-only machine or when the settings are invalid
    (the settings check reports those)."""
    from imagenet_int8_assets.core.latents.devices import DeviceSettingError, gpu_pool_limit, visible_devices

    try:
        devices = visible_devices(os.environ.get("IMAGENET_INT8_DEVICES"), os.environ.get("IMAGENET_INT8_DEVICE") or "auto")
    except DeviceSettingError:
        return 1
    return gpu_pool_limit(devices)


class InstanceSettingError(ValueError):
    """The environment asks for an instance it does not fully describe."""


def shipped_instance_yaml() -> Path:
    """The dagster.yaml to write into a new DAGSTER_HOME: the PostgreSQL variant when
    DAGSTER_PG_HOST is set (every DAGSTER_PG_* variable is then required), else SQLite."""
    if not os.environ.get("DAGSTER_PG_HOST"):
        return SHIPPED_DAGSTER_YAML
    missing = [name for name in POSTGRES_VARS if name not in os.environ]
    if missing:
        raise InstanceSettingError(
            f"DAGSTER_PG_HOST is set, so the instance is PostgreSQL, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: set all of {', '.join(POSTGRES_VARS)} "
            "(DAGSTER_PG_PASSWORD may be empty), or unset DAGSTER_PG_HOST for the SQLite instance."
        )
    port = os.environ["DAGSTER_PG_PORT"].strip()
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InstanceSettingError(
            f"DAGSTER_PG_PORT={port!r}: use the PostgreSQL server's port, a number from 1 to 65535 (usually 5432)."
        )
    return SHIPPED_POSTGRES_YAML


def _innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def instance_error_message(exc: BaseException, home: Path) -> str | None:
    """One line for an instance that cannot be opened because of its settings (a variable its
    dagster.yaml reads, a PostgreSQL server that does not answer): what is wrong and what to do (no
    traceback); None for other causes (a full disk: the CLI reports those itself)."""
    from dagster._config.errors import PostProcessingError
    from dagster._core.errors import DagsterInvalidConfigError

    inner = _innermost(exc)
    where = f"the Dagster instance in DAGSTER_HOME={home} ({home / 'dagster.yaml'})"
    config_errors = [e.message for e in getattr(exc, "errors", None) or []] if isinstance(exc, DagsterInvalidConfigError) else []
    if isinstance(inner, PostProcessingError) or config_errors:  # a variable its dagster.yaml reads: unset, not a number
        import re

        text = " ".join(config_errors) + " " + str(inner)
        names = sorted(set(re.findall(r"'env': '([A-Za-z_][A-Za-z0-9_]*)'", text) + re.findall(r'variable "([A-Za-z_][A-Za-z0-9_]*)"', text)))
        bad = [f"{n} (not set)" if n not in os.environ else f"{n}={os.environ[n]!r} (not valid there)" for n in names]
        return (
            f"{where} cannot be loaded: it reads {', '.join(bad) or 'environment variables'} from the environment. "
            f"Set {'them' if len(bad) > 1 else 'it'} (for PostgreSQL: all of {', '.join(POSTGRES_VARS)}; the port a "
            "number), or point DAGSTER_HOME at another folder."
        )
    text = f"{type(exc).__name__} {type(inner).__name__} {exc} {inner}".lower()
    if "postgres" in text or "psycopg" in text or "connection" in text:
        target = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in POSTGRES_VARS if name != "DAGSTER_PG_PASSWORD")
        return (
            f"{where} is a PostgreSQL instance that cannot be reached ({target}): {_first_line(inner)} Start "
            "PostgreSQL there or fix the DAGSTER_PG_* variables (the password in DAGSTER_PG_PASSWORD), then run this "
            "command again."
        )
    return None


@contextmanager
def open_instance(home: Path) -> Iterator:
    """``DagsterInstance.get()`` for ``home``; an instance that cannot be opened (PostgreSQL
    unreachable, a variable its dagster.yaml needs unset or not a number) raises
    ``InstanceSettingError`` with one line saying what to do."""
    from dagster import DagsterInstance

    try:
        instance = DagsterInstance.get()
    except Exception as exc:
        message = instance_error_message(exc, home)
        if message is None:
            raise
        raise InstanceSettingError(message) from None
    with instance:
        yield instance


def _recorded_limit(home: Path) -> int | None:
    try:
        value = json.loads((home / GPU_POOL_RECORD).read_text()).get("limit")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def prepare_dagster_home(default_home: str | os.PathLike, devices: Sequence[str] | None = None) -> Path:
    """Use DAGSTER_HOME (or ``default_home``), with the shipped dagster.yaml and the gpu pool.

    Sets DAGSTER_HOME for this process. A home without dagster.yaml gets the shipped one
    (``shipped_instance_yaml``: PostgreSQL when DAGSTER_PG_HOST is set). The ``gpu`` pool's limit is written into the instance
    explicitly: one run per device (``devices``, default ``default_gpu_pool_limit()``: every GPU,
    1 on a CPU-only machine), since each encode run leases one device (``core.latents.devices``). It is
    explicit because Dagster 1.13.27 only applies ``pools.default_limit`` to a pool after its
    queue daemon has first seen it, so two queued GPU runs seen together could both start.
    The limit written is recorded in ``<home>/.imagenet-int8-gpu-pool.json`` and follows the
    device count on later calls; a limit the user has set (one that differs from the recorded
    one) is left alone. A home prepared before the record existed holds the old fixed limit of 1,
    which is treated as ours.

    Several processes may share one DAGSTER_HOME (builds of different outputs): creating and
    migrating its SQLite storage is serialized by a lock file in it, because two processes
    initializing it at once leave two alembic heads and an instance that no longer opens.
    """
    from imagenet_int8_assets.core.latents.devices import gpu_pool_limit

    home = dagster_home_path(default_home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    limit = gpu_pool_limit(devices) if devices is not None else default_gpu_pool_limit()
    with hold_init_lock(home):
        if not (home / "dagster.yaml").exists():
            shutil.copyfile(shipped_instance_yaml(), home / "dagster.yaml")
        with open_instance(home) as instance:
            storage = instance.event_log_storage
            if GPU_POOL not in storage.get_concurrency_keys():
                current, ours = None, None
            else:
                current = storage.get_concurrency_info(GPU_POOL).slot_count
                ours = _recorded_limit(home)
                if ours is None and not (home / GPU_POOL_RECORD).exists():
                    ours = 1  # written by the code before the record: the fixed limit of 1
            if current is None or (current == ours and current != limit):
                storage.set_concurrency_slots(GPU_POOL, limit)
                (home / GPU_POOL_RECORD).write_text(json.dumps({"limit": limit}) + "\n")
            elif current == ours and not (home / GPU_POOL_RECORD).exists():
                (home / GPU_POOL_RECORD).write_text(json.dumps({"limit": limit}) + "\n")
    return home
