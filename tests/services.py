"""Real services for integration tests: an MLflow tracking server, a Prefect server and a process worker.

Every service is started in its own session (``start_new_session=True``) so that stopping it sends
SIGTERM (then SIGKILL) to exactly the process group this module started, by its PID. Stores live in
directories the caller gives (pytest tmp dirs); nothing touches ``~/.prefect`` or the repository.
Only 127.0.0.1 is used.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    p = VENV_BIN / name
    return str(p) if p.exists() else name


def base_env(prefect_home: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for child processes: analytics off, quiet, isolated PREFECT_HOME."""
    env = dict(os.environ)
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PREFECT_CLI_PROMPT="false",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        PYTHONUNBUFFERED="1",
    )
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    env.update(extra)
    return env


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log_path: Path
    url: str = ""
    extra: dict = field(default_factory=dict)

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group we started (by its PID), then SIGKILL if it lingers."""
        if self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session=True: the child leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        # children left in the group (uvicorn workers, flow-run subprocesses)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to the process group we started (by its PID), as a crash would end it; waits for the exit."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@contextmanager
def running(svc: Service):
    """``svc`` for the length of a ``with`` block, stopped (by PID) when it ends."""
    try:
        yield svc
    finally:
        svc.stop()


def _spawn(name: str, args: list[str], log_path: Path, env: dict, cwd: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=str(cwd), start_new_session=True,
        )
    finally:
        log.close()


def wait_http(url: str, svc: Service, timeout: float, ok=lambda body: True) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not svc.alive():
            raise RuntimeError(f"{svc.name} exited with code {svc.proc.returncode} before answering {url}:\n{svc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                body = r.read().decode(errors="replace")
                if r.status == 200 and ok(body):
                    return
        except (urllib.error.URLError, OSError, ConnectionError) as e:
            last = e
        time.sleep(0.3)
    svc.stop()
    raise RuntimeError(f"{svc.name} did not answer {url} within {timeout:.0f}s (last error: {last}):\n{svc.log_tail()}")


def start_mlflow_server(root: Path, port: int | None = None, timeout: float = 90.0) -> Service:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and a proxied artifact store under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        _exe("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    svc = Service("mlflow server", _spawn("mlflow", args, root / "mlflow-server.log", base_env(), root),
                  root / "mlflow-server.log", url=f"http://127.0.0.1:{port}")
    svc.extra.update(port=port, root=root, args=args)
    wait_http(svc.url + "/health", svc, timeout)
    return svc


def start_mlflow_ui(argv: list[str], cwd: Path, log_path: Path, timeout: float = 90.0) -> Service:
    """A ``mlflow ui ...`` command line as a user types it (``--port`` must be in it); waits for /health."""
    port = argv[argv.index("--port") + 1]
    svc = Service("mlflow ui", _spawn("mlflow-ui", argv, log_path, base_env(), cwd), log_path,
                  url=f"http://127.0.0.1:{port}")
    wait_http(svc.url + "/health", svc, timeout)
    return svc


def restart_mlflow_server(old: Service, timeout: float = 90.0) -> Service:
    """Start a server on the same port and stores as ``old`` (which must be stopped)."""
    return start_mlflow_server(old.extra["root"], old.extra["port"], timeout)


def start_prefect_server(home: Path, port: int | None = None, timeout: float = 150.0) -> Service:
    """``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME (SQLite database inside it)."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = base_env(home, PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                   PREFECT_UI_ENABLED="false", PREFECT_API_URL="")
    env.pop("PREFECT_API_URL")
    args = [_exe("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    svc = Service("prefect server", _spawn("prefect-server", args, home / "prefect-server.log", env, home),
                  home / "prefect-server.log", url=f"http://127.0.0.1:{port}/api")
    svc.extra.update(port=port, home=home)
    wait_http(svc.url + "/health", svc, timeout, ok=lambda b: b.strip() == "true")
    return svc


def prefect_cli(args: list[str], home: Path, api_url: str, cwd: Path = REPO, timeout: float = 180.0,
                env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = base_env(home, PREFECT_API_URL=api_url, **(env_extra or {}))
    return subprocess.run([_exe("prefect"), "--no-prompt", *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def start_prefect_worker(home: Path, api_url: str, pool: str, cwd: Path = REPO, env_extra: dict | None = None) -> Service:
    env = base_env(home, PREFECT_API_URL=api_url, **(env_extra or {}))
    args = [_exe("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"]
    log = home / f"worker-{pool}.log"
    svc = Service("prefect worker", _spawn("prefect-worker", args, log, env, cwd), log, url=api_url)
    return svc


def api_json(url: str, payload: dict | None = None, method: str | None = None, timeout: float = 10.0):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())
