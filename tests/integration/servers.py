"""Throw-away servers for the integration tests: a PostgreSQL cluster and an MLflow
tracking server on it, both on free loopback ports, gone at the end of the session.

PostgreSQL: `initdb` (trust auth, no fsync) into a temp folder, `pg_ctl start` listening
on 127.0.0.1 only, its socket in that folder. initdb refuses to run as root, so as root
(CI) the cluster belongs to an unprivileged user (`postgres`, else `nobody`) and every
PostgreSQL command runs through `runuser`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, else initdb on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
                   if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    bin: Path
    folder: Path
    port: int
    user: str | None   # run the server as this user (we are root), else as ourselves

    def _run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, **kw)

    @classmethod
    def start(cls) -> Postgres:
        bindir = postgres_bin()
        if bindir is None:
            pytest.skip("no PostgreSQL server binaries (initdb) in /usr/lib/postgresql/*/bin or on PATH")
        user = None
        if os.geteuid() == 0:
            names = [u for u in ("postgres", "nobody") if _user_exists(u)]
            if not names:
                pytest.skip("running as root without an unprivileged user for PostgreSQL (postgres, nobody)")
            user = names[0]
        folder = Path(tempfile.mkdtemp(prefix="flexunet-pg-"))
        if user:
            entry = pwd.getpwnam(user)
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        pg = cls(bindir, folder, free_port(), user)
        pg._run(str(bindir / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres",
                "--no-sync", "-E", "UTF8", "--no-instructions")
        options = (f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {folder} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
        pg._run(str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "server.log"),
                "-o", options, "-w", "-t", "30", "start")
        return pg

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL (psycopg 3 driver)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@dataclass
class MlflowServer:
    process: subprocess.Popen
    uri: str
    log: Path

    @classmethod
    def start(cls, backend_uri: str, artifacts: Path, timeout: float = 90) -> MlflowServer:
        port = free_port()
        log = artifacts.parent / "mlflow-server.log"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(log, "w") as out:
            process = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
                 "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        server = cls(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(server.uri + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return server
            except OSError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"mlflow server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)   # its own session: the server and its workers;
            self.process.wait()                           # throw-away, so no graceful shutdown (seconds)
