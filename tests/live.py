"""Real processes for the tests: the service under uvicorn on a loopback port, and waiting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until check() returns something truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.TransportError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


class ServiceProcess:
    """`uvicorn app.main:create_app` on 127.0.0.1:port with extra environment; ready on return."""

    def __init__(self, port: int, **env: str):
        # its own results database, removed at stop, unless the test shares one (a restart)
        self._own_state = None
        if "FRACTURE_STATE_DIR" not in env:
            self._own_state = tempfile.TemporaryDirectory(prefix="fracture-state-")
            env["FRACTURE_STATE_DIR"] = self._own_state.name
        self.state_dir = env["FRACTURE_STATE_DIR"]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env={**os.environ, **env},
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        try:
            wait_for(
                lambda: self.http.get("/readyz").status_code == 200, 120, "the service to be ready"
            )
        except BaseException:
            self.stop()  # never leave a server behind a failed test
            raise

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._forget_state()

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._forget_state()

    def _forget_state(self) -> None:
        if self._own_state is not None:
            self._own_state.cleanup()
            self._own_state = None
