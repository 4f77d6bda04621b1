"""The Dagster instance the CLI (and anyone following the README) records runs in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from imagenet_int8_assets.core.build_lock import hold_init_lock

SHIPPED_DAGSTER_YAML = Path(__file__).with_name("dagster.yaml")
GPU_POOL = "gpu"


def dagster_home_path(default_home: str | os.PathLike) -> Path:
    """The DAGSTER_HOME the CLI uses: the variable when set, else ``default_home``."""
    return Path(os.environ.get("DAGSTER_HOME") or default_home).expanduser().resolve()


def prepare_dagster_home(default_home: str | os.PathLike) -> Path:
    """Use DAGSTER_HOME (or ``default_home``), with the shipped dagster.yaml and the gpu pool.

    Sets DAGSTER_HOME for this process. The ``gpu`` pool's limit of one run is written into the
    instance explicitly: Dagster 1.13.27 only applies ``pools.default_limit`` to a pool after its
    queue daemon has first seen it, so two queued GPU runs seen together could both start.
    A limit the user has already set is left alone.

    Several processes may share one DAGSTER_HOME (builds of different outputs): creating and
    migrating its SQLite storage is serialized by a lock file in it, because two processes
    initializing it at once leave two alembic heads and an instance that no longer opens.
    """
    from dagster import DagsterInstance

    home = dagster_home_path(default_home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    with hold_init_lock(home):
        if not (home / "dagster.yaml").exists():
            shutil.copyfile(SHIPPED_DAGSTER_YAML, home / "dagster.yaml")
        with DagsterInstance.get() as instance:
            storage = instance.event_log_storage
            if GPU_POOL not in storage.get_concurrency_keys():
                storage.set_concurrency_slots(GPU_POOL, 1)
    return home
