"""A real ``prefect server`` on 127.0.0.1 for the session, with its own PREFECT_HOME in tmp.

Fixtures:
    prefect_server (session): a running server; ``.api_url`` and ``.env`` (what a CLI call,
        worker or flow needs to talk to it).
    prefect_api (function): sets PREFECT_API_URL (and friends) for in-process flow runs.
    deployed (session): prefect.yaml deployed on that server (pool pneumo-process, the
        `retraining` queue limited to 1 as deployments/README.md says); the CLI's environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.processes import free_port, stop_process, wait_http

REPO = Path(__file__).resolve().parents[2]


def prefect_executable() -> str:
    """The ``prefect`` console script next to the running interpreter."""
    candidate = Path(sys.executable).parent / "prefect"
    return str(candidate) if candidate.exists() else "prefect"


class PrefectServer:
    """A ``prefect server start`` subprocess."""

    def __init__(self, process: subprocess.Popen[Any], port: int, home: Path, log: Path) -> None:
        self.process = process
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.home = home
        self.log = log
        self.env = {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }

    @classmethod
    def start(cls, home: Path) -> PrefectServer:
        """Start on a free port and wait for ``/api/health``."""
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = home / "server.log"
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_UI_ENABLED": "false",
               # Schedules are turned into runs within seconds, not a minute (tests wait for one).
               "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
        env.pop("PREFECT_API_URL", None)
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=home, start_new_session=True)
        wait_http(f"http://127.0.0.1:{port}/api/health", process, timeout=180, log=log)
        return cls(process, port, home, log)

    def stop(self) -> None:
        """Terminate the server."""
        stop_process(self.process)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One Prefect server for the session."""
    server = PrefectServer.start(tmp_path_factory.mktemp("prefect-home"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefect_api(prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrefectServer]:
    """Point in-process flow runs at the session's server (never a temporary one)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in prefect_server.env.items():
        monkeypatch.setenv(key, value)  # for subprocesses and Dask workers
    # Prefect resolves its settings once per process; the environment alone comes too late.
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server


def prefect_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``prefect ARGS`` in the repository; fails the test with its output when it fails."""
    result = subprocess.run([prefect_executable(), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="session")
def deployed(prefect_server: PrefectServer) -> dict[str, str]:
    """prefect.yaml deployed as deployments/README.md says; returns the environment for CLI calls."""
    env = {**os.environ, **prefect_server.env, "PREFECT_CLI_PROMPT": "false"}
    env.pop("PNEUMO_REPO_DIR", None)  # resolved on the worker at run time, not stored at deploy time
    prefect_cli(env, "work-pool", "create", "pneumo-process", "--type", "process",
                "--base-job-template", str(REPO / "deployments" / "process.json"), "--overwrite")
    prefect_cli(env, "--no-prompt", "deploy", "--all")
    prefect_cli(env, "work-queue", "set-concurrency-limit", "retraining", "1", "--pool", "pneumo-process")
    return env
