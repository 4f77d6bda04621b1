"""Every test in servers/ starts real servers (`dagster dev`'s webserver and daemon, PostgreSQL,
S3): all of them are marked ``slow``. Also the session's PostgreSQL server."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the session; each test creates its own database
    (``postgres.create_database()``, ``postgres.env(db)``)."""
    from imagenet_int8_assets_tests.support.local_servers import postgres_server

    with postgres_server() as server:
        yield server
