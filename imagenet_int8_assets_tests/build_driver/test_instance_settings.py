"""build.instance: the PostgreSQL instance's settings are the SQLite instance's, and an instance
that cannot be opened (settings missing or invalid, PostgreSQL not answering) is refused in one
line saying what to set, with exit code 2 from the CLI. (The builds and the backfill on a real
PostgreSQL server are in servers/test_postgres_instance.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imagenet_int8_assets.build.instance import SHIPPED_DAGSTER_YAML, SHIPPED_POSTGRES_YAML, prepare_dagster_home
from imagenet_int8_assets_tests.support.builds import BIN, cli_env, run_cli
from imagenet_int8_assets_tests.support.local_servers import free_port


def test_the_postgres_instance_has_the_sqlite_instances_settings():
    sqlite, postgres = (yaml.safe_load(p.read_text()) for p in (SHIPPED_DAGSTER_YAML, SHIPPED_POSTGRES_YAML))
    storage = postgres.pop("storage")
    assert postgres == sqlite  # the gpu pool, run retries and run monitoring configured the same way
    assert storage["postgres"]["postgres_db"].pop("scheme") == "postgresql+psycopg2"
    assert {k: v["env"] for k, v in storage["postgres"]["postgres_db"].items()} == {
        "username": "DAGSTER_PG_USERNAME", "password": "DAGSTER_PG_PASSWORD", "hostname": "DAGSTER_PG_HOST",
        "db_name": "DAGSTER_PG_DB", "port": "DAGSTER_PG_PORT",
    }


def test_an_incomplete_postgres_connection_is_refused_with_what_to_set(tmp_path):
    env = cli_env(tmp_path, DAGSTER_PG_HOST="127.0.0.1")
    proc = run_cli([str(BIN / "imagenet-int8"), "build"], env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "DAGSTER_PG_USERNAME, DAGSTER_PG_PASSWORD, DAGSTER_PG_DB, DAGSTER_PG_PORT are not" in proc.stderr
    assert "or unset DAGSTER_PG_HOST" in proc.stderr and "Traceback" not in proc.stderr


def _refusal(home: Path, monkeypatch) -> str:
    from imagenet_int8_assets.build.instance import InstanceSettingError

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with pytest.raises(InstanceSettingError) as refused:
        prepare_dagster_home(home)
    message = str(refused.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.slow
def test_an_instance_that_cannot_be_opened_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    """PostgreSQL not answering, DAGSTER_PG_PORT not a number, a PostgreSQL dagster.yaml without its
    variables: one line each, exit code 2 (they ended in raw tracebacks)."""
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "pg-home"
    home.mkdir()
    (home / "dagster.yaml").write_text(SHIPPED_POSTGRES_YAML.read_text())
    message = _refusal(home, monkeypatch)  # the PostgreSQL dagster.yaml, none of its variables set
    assert "DAGSTER_PG_HOST (not set)" in message and "point DAGSTER_HOME at another folder" in message, message

    monkeypatch.setenv("DAGSTER_PG_HOST", "127.0.0.1")
    for name, value in (("DAGSTER_PG_DB", "db"), ("DAGSTER_PG_USERNAME", "me"), ("DAGSTER_PG_PASSWORD", "pw")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_PG_PORT", "abc")
    assert "DAGSTER_PG_PORT='abc' (not valid there)" in _refusal(home, monkeypatch)
    assert "DAGSTER_PG_PORT='abc': use the PostgreSQL server's port" in _refusal(tmp_path / "new-home", monkeypatch)

    monkeypatch.setenv("DAGSTER_PG_PORT", str(free_port()))  # nothing listens there
    message = _refusal(home, monkeypatch)
    assert "is a PostgreSQL instance that cannot be reached" in message and "Connection refused" in message, message
    assert "pw" not in message.replace("DAGSTER_PG_PASSWORD", "")  # the password is never shown

    env = cli_env(tmp_path, DAGSTER_HOME=str(home), DAGSTER_PG_HOST="127.0.0.1", DAGSTER_PG_PORT="abc",
                  DAGSTER_PG_DB="db", DAGSTER_PG_USERNAME="me", DAGSTER_PG_PASSWORD="pw")
    proc = run_cli([str(BIN / "imagenet-int8"), "build"], env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0 and "DAGSTER_PG_PORT='abc'" in proc.stderr, proc.stderr[-3000:]
