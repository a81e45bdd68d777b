"""A throwaway PostgreSQL server for tests: its own data folder, socket folder and a free loopback port.

Started from the Debian package's binaries (`initdb`, `postgres`); PostgreSQL refuses to run as root, so
when the tests run as root the server runs as the `postgres` OS user. Stopped by its own PID.
Without the binaries, tests skip with the reason — except when CI=true, where that is a failure (the CI
script installs them, so a missing install must be noticed).
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def pg_bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:   # resolve a symlink on PATH to the package's folder, which has postgres and pg_isready too
        folder = Path(found).resolve().parent
        if (folder / "postgres").exists() and (folder / "pg_isready").exists():
            return folder
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def require_postgres() -> Path:
    """The binaries' folder, or skip (fail in CI) saying what is missing."""
    found = pg_bin_dir()
    if found is None:
        reason = ("PostgreSQL server binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql/*/bin; "
                  "install the 'postgresql' package (the CI script .ci/run does)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " [CI=true: a missing install fails instead of skipping]")
        pytest.skip(reason)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="it-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.as_user = {}
        if os.geteuid() == 0:   # postgres refuses root: run it as the package's OS user
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, **self.as_user)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=100"],
            stdout=log, stderr=subprocess.STDOUT, **self.as_user)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.root / 'server.log').read_text()[-2000:]}")
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("postgres did not start within 60 s")

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster we started), waited for."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def reset(self) -> None:
        """Drop the job tables (between tests sharing one server)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS jobs, job_events")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
