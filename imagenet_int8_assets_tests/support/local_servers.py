"""Test support: real servers on 127.0.0.1 that the tests start themselves.

* PostgreSQL from Debian's ``postgresql`` package (``.ci/run`` installs it): a throwaway cluster
  (``initdb``, ``pg_ctl``) with trust authentication, one database per test.
* An S3-compatible object store: moto's server mode (``ThreadedMotoServer``), reached by boto3 and
  by mosaicml-streaming's reader through ``S3_ENDPOINT_URL``.

Missing server binaries fail the test with what to install; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_USER = "dagster"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (yet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin() -> Path:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if Path(folder, "pg_ctl").is_file():
            return Path(folder)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    pytest.fail("No PostgreSQL server binaries (pg_ctl): install Debian's postgresql package (`apt-get install -y "
                "postgresql`; .ci/run does) to run the PostgreSQL instance tests.")


@dataclass
class Postgres:
    port: int
    host: str = "127.0.0.1"

    def create_database(self) -> str:
        import psycopg2

        name = "t_" + uuid.uuid4().hex[:12]
        conn = psycopg2.connect(host=self.host, port=self.port, user=PG_USER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def env(self, db_name: str) -> dict[str, str]:
        """The DAGSTER_PG_* variables the shipped dagster-postgres.yaml reads."""
        return {
            "DAGSTER_PG_USERNAME": PG_USER, "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_DB": db_name, "DAGSTER_PG_PORT": str(self.port),
        }

    def query(self, db_name: str, sql: str) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=PG_USER, dbname=db_name)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall()
        finally:
            conn.close()


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A PostgreSQL cluster of its own in a temp folder, listening on 127.0.0.1 only."""
    binaries = _postgres_bin()
    # not pytest's tmp_path: its parents are private to root, and the server runs as 'postgres'
    folder = Path(tempfile.mkdtemp(prefix="imagenet-int8-pg-", dir="/tmp"))
    as_server = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(folder, "postgres", "postgres")
        as_server = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()

    def run(*args: str, timeout: float = 120) -> None:
        proc = subprocess.run([*as_server, *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}\n{log[-2000:]}")

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=300"
        run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60",
            "-o", options, "start")
        try:
            yield Postgres(port)
        finally:
            with contextlib.suppress(Exception):
                run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class S3Server:
    endpoint: str

    def env(self) -> dict[str, str]:
        """What boto3 and streaming's reader need to reach it (fake credentials: moto accepts any)."""
        return {
            "S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).client("s3", endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        name = "b-" + uuid.uuid4().hex[:12]
        self.client().create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
