"""A real team tracking server for tests: ``mlflow server`` on PostgreSQL, with basic auth.

``TeamServer`` creates a fresh PostgreSQL database (a unique name, dropped at the
end), writes a basic-auth ini whose own user database is a second fresh
PostgreSQL database (``default_permission = READ``, an admin we choose), and
starts ``mlflow server --app-name basic-auth`` with artifacts proxied by the
server (``--serve-artifacts``) into a temporary folder, on a free 127.0.0.1
port. ``stop()`` terminates the whole process group, then kills it.

PostgreSQL missing means ``pytest.skip``, unless the ``CI`` environment variable
is set: CI must run these tests, so there it is a failure.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import torch

PG_HOST = os.environ.get("TASKVEC_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TASKVEC_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TASKVEC_TEST_PG_USER", "postgres")
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-password-" + secrets.token_hex(4)
STARTUP_TIMEOUT_S = 180


def skip_or_fail(reason: str, allow_module_level: bool = False) -> None:
    """Skip a test (or, with ``allow_module_level``, a whole module) whose infrastructure is
    missing; in CI (``CI`` set) fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


# A CUDA GPU is hardware that CI does not provide: rows that need one skip, in CI too.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def import_or_skip_or_fail(module: str, install: str):
    """``pytest.importorskip`` under the skip-or-fail rule: the module, or a module-level skip
    naming what to install (a failure in CI)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        skip_or_fail(f"{module} is not importable ({exc}): {install}", allow_module_level=True)


def _pg_connect(dbname: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=5)


def require_postgres() -> None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        skip_or_fail("psycopg2 is not installed (pip install -e '.[dev]')")
    try:
        _pg_connect().close()
    except Exception as exc:  # psycopg2.OperationalError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        skip_or_fail(f"PostgreSQL is not reachable at {PG_USER}@{PG_HOST}:{PG_PORT}: {first}")


def create_database(prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = _pg_connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return name


def drop_database(name: str) -> None:
    conn = _pg_connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def pg_uri(dbname: str, driver: str | None = "psycopg2") -> str:
    """A SQLAlchemy URL for ``dbname``; ``driver=None`` leaves the driver to SQLAlchemy's default."""
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the server names the driver we ship.
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The test process's environment without any MLflow settings, the venv's tools first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class MlflowServer:
    """``mlflow server`` on a fresh PostgreSQL database; ``auth=True`` adds the basic-auth app."""

    root: Path
    auth: bool = True
    workers: int = 2
    port: int = field(default_factory=free_port)
    databases: list[str] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=lambda: {ADMIN_USER: ADMIN_PASSWORD})
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.secret_key = secrets.token_hex(16)
        self.backend_db = create_database("taskvec_server")
        self.databases.append(self.backend_db)
        self.auth_ini = None
        if self.auth:
            auth_db = create_database("taskvec_auth")
            self.databases.append(auth_db)
            self.auth_ini = self.root / "basic_auth.ini"
            self.auth_ini.write_text(
                "[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = {pg_uri(auth_db)}\n"
                f"admin_username = {ADMIN_USER}\n"
                f"admin_password = {ADMIN_PASSWORD}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                # Without the cache every request re-hashes the password (PBKDF2): ~0.3 s of CPU each here.
                "auth_cache_ttl_seconds = 600\n",
                "utf-8",
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", pg_uri(self.backend_db),
            "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
            "--default-artifact-root", "mlflow-artifacts:/",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip
        env = _clean_env()
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = self.secret_key
        # No background job runner (GenAI scoring, trace archival): it competes for the CPUs.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_ini)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text("utf-8", errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """Kill the server at once (SIGKILL to its process group), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Terminate the server's process group; kill it if it does not exit within 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Stop the server and drop its databases."""
        self.stop()
        for name in self.databases:
            drop_database(name)
        self.databases.clear()

    # -- clients ------------------------------------------------------------------

    def env(self, user: str | None = None, password: str | None = None, **extra: str) -> dict[str, str]:
        """The environment for a CLI subprocess talking to this server as ``user``."""
        env = _clean_env()
        env["MLFLOW_TRACKING_URI"] = self.url
        # A dead server should fail a command in seconds, not after minutes of retries.
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "2"
        env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "60"
        if user is not None:
            env["MLFLOW_TRACKING_USERNAME"] = user
            env["MLFLOW_TRACKING_PASSWORD"] = password if password is not None else self.passwords[user]
        env.update(extra)
        return env

    @contextmanager
    def as_user(self, user: str = ADMIN_USER, **extra: str) -> Iterator[None]:
        """Point this process's MLflow at the server as ``user`` until exit."""
        import mlflow

        keys = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", *extra)
        saved = {k: os.environ.get(k) for k in keys}
        previous_uri = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
        os.environ.update(MLFLOW_TRACKING_URI=self.url, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=self.passwords[user], **extra)
        mlflow.set_tracking_uri(self.url)
        try:
            yield
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            mlflow.set_tracking_uri(previous_uri)

    def auth_client(self):
        """mlflow's ``AuthServiceClient`` for this server (call inside ``as_user(ADMIN_USER)``)."""
        from mlflow.server import get_app_client

        return get_app_client("basic-auth", tracking_uri=self.url)

    def create_user(self, user: str, password: str | None = None) -> str:
        password = password or f"{user}-password-{secrets.token_hex(4)}"
        with self.as_user(ADMIN_USER):
            self.auth_client().create_user(user, password)
        self.passwords[user] = password
        return password

    def grant(self, user: str, resource_type: str, resource_id: str, permission: str) -> None:
        """Give ``user`` ``permission`` (READ, USE, EDIT, MANAGE) on an ``experiment`` or ``registered_model``."""
        with self.as_user(ADMIN_USER):
            self.auth_client().grant_user_permission(user, resource_type, str(resource_id), permission)


def start_server(root: Path, auth: bool = True) -> MlflowServer:
    require_postgres()
    server = MlflowServer(root, auth=auth)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


class CuttingProxy:
    """A TCP proxy in front of a server that calls ``on_cut()`` once a request whose
    first line contains ``marker`` has sent more than ``after_bytes`` bytes of body,
    then drops that connection: a crash in the middle of an upload, at a known point."""

    def __init__(self, target_port: int, marker: bytes, after_bytes: int, on_cut):
        self.target_port = target_port
        self.marker = marker
        self.after_bytes = after_bytes
        self.on_cut = on_cut
        self.cut = threading.Event()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=60)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        watching, sent = False, 0
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if not self.cut.is_set() and data[:8].split(b" ")[0] in (b"PUT", b"POST", b"GET", b"PATCH", b"DELETE"):
                    watching = self.marker in data.split(b"\r\n", 1)[0]
                    sent = -len(data.split(b"\r\n\r\n", 1)[0])
                if watching and not self.cut.is_set():
                    sent += len(data)
                    if sent > self.after_bytes:
                        self.cut.set()
                        self.on_cut()
                        break
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
