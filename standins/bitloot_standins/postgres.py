"""Throwaway PostgreSQL databases for tests, the end-to-end checks and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa


@contextmanager
def temporary_database(server_url: str, prefix: str) -> Iterator[str]:
    """Create an empty database on `server_url` (a URL without a database name) and yield its name; drop it,
    connections and all, when the block ends, even on Ctrl-C."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    # No pool: a connection kept from the CREATE would be stale after a restart of the server.
    admin = sa.create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class PostgresCluster:
    """A PostgreSQL cluster of its own (initdb in a temporary directory, its own port), for tests and benchmarks
    that stop, start or cut off the database: never the machine's shared server. Run as root, the server runs as
    the `postgres` system user (PostgreSQL refuses root)."""

    def __init__(self, bin_dir: str = "/usr/lib/postgresql/15/bin", max_connections: int = 300,
                 host: str = "127.0.0.1"):
        """`host`: the address the server listens on (another host's, inside a network namespace)."""
        self.bin_dir, self.max_connections, self.host = Path(bin_dir), max_connections, host
        self.port = _free_port(host)
        self.directory = Path(tempfile.mkdtemp(prefix="pg_cluster_"))
        self.data = self.directory / "data"

    @property
    def url(self) -> str:
        """The server's URL without a database name (psycopg 3), like `TEST_PG_SERVER_URL`."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}"

    def __enter__(self) -> PostgresCluster:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
        self._as_owner("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        if self.host != "127.0.0.1":  # clients on the other hosts of its network, trusted like local ones
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all samenet trust\n")
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop(mode="immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """A new empty database on this cluster (gone with the cluster); its URL."""
        admin = sa.create_engine(f"{self.url}/postgres", isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return f"{self.url}/{name}"

    def start(self) -> None:
        # fsync off: a throw-away cluster; a fast stop still writes everything, so restarts lose nothing.
        options = (f"-p {self.port} -c listen_addresses={self.host} -c unix_socket_directories={self.directory} "
                   f"-c max_connections={self.max_connections} -c fsync=off -c full_page_writes=off")
        self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "server.log"), "-o", options,
                       "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast`: the server ends every session (rolling back open transactions) and shuts down cleanly."""
        self._as_owner("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def terminate_backends(self, database: str) -> int:
        """Cut every connection to `database` (pg_terminate_backend) without a restart; how many were cut."""
        admin = sa.create_engine(f"{self.url}/postgres", isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        try:
            with admin.connect() as conn:
                return len(conn.execute(sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": database}).all())
        finally:
            admin.dispose()

    def _as_owner(self, program: str, *args: str) -> None:
        command = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.directory, timeout=120)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
