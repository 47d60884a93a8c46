"""Real servers for tests, started on loopback and stopped after: `mlflow server` (any backend store and artifact
destination) and a throw-away PostgreSQL 15 cluster. Each start waits for health and fails in one line naming why,
with the tail of the server's log."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from maskflow.runtime import free_port

VENV_BIN = Path(sys.executable).parent
MLFLOW_SERVER_START_S = 180  # ~10 s on an idle 2-core machine (imports, migrations, uvicorn); far more when loaded


def log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").rstrip() if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


@contextlib.contextmanager
def mlflow_server(workdir: Path, backend_store_uri: str, artifacts_destination: str,
                  env_extra: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` on a free loopback port with ``--allowed-hosts`` set to that address (as production runs it),
    healthy (GET /health) within MLFLOW_SERVER_START_S; yields its URL."""
    port = free_port()
    log_path = workdir / f"mlflow-server-{port}.log"
    log = open(log_path, "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_ENABLE_TELEMETRY="false", **(env_extra or {}))
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination,
         "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        failure = None
        while failure is None:
            if proc.poll() is not None:
                failure = f"exited with status {proc.returncode} after {time.monotonic() - started:.0f} s"
                break
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > MLFLOW_SERVER_START_S:
                failure = f"not healthy at {url}/health after {MLFLOW_SERVER_START_S} s"
            else:
                time.sleep(0.5)
        if failure:
            log.flush()
            pytest.fail(f"mlflow server did not start: {failure}; last lines of {log_path}:\n{log_tail(log_path)}",
                        pytrace=False)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server's own process group: uvicorn and its worker
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        log.close()


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl, Debian's postgresql 15) on a free loopback port with a
    database ``mlflow``; yields ``postgresql://postgres@127.0.0.1:<port>/mlflow``. Skipped, saying why, where the
    binaries are absent. initdb refuses to run as root: as root it runs as the ``postgres`` user."""
    missing = [b for b in ("initdb", "pg_ctl", "psql") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"PostgreSQL binaries not on PATH: {', '.join(missing)} (Debian: apt install postgresql)")
    as_user: list[str] = []
    base = tempfile.mkdtemp(prefix="mf-pg-", dir="/tmp")  # not under pytest's 0700 tmp: the postgres user reads it
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run initdb as")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log_path, port = os.path.join(base, "data"), Path(base) / "postgres.log", free_port()

    def run(cmd: list[str], what: str) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            pytest.fail(f"PostgreSQL {what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}"
                        f"; server log:\n{log_tail(log_path)}", pytrace=False)

    try:
        run(as_user + ["initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"], "initdb")
        run(as_user + ["pg_ctl", "-D", data, "-l", str(log_path), "-w", "-t", "120", "-o",
                       f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], "start")
        run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-q", "-c", "CREATE DATABASE mlflow"],
            "CREATE DATABASE")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            subprocess.run(as_user + ["pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True,
                           timeout=60)
        shutil.rmtree(base, ignore_errors=True)
