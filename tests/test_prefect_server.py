"""End to end: `prefect server start` + `python -m flows.pipeline` with PREFECT_API_URL.

This is what `make ui` + `make flow` do: a real Prefect server on 127.0.0.1 (own
PREFECT_HOME and sqlite database under tmp_path), the flow's CLI in a subprocess pointed
at it, then the flow run, task runs, logs and artifacts read back over the server's REST
API. The server is always terminated at teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows import testing as demo

REPO_ROOT = Path(__file__).resolve().parents[1]
HEALTH_TIMEOUT_S = 90

pytestmark = pytest.mark.timeout(400)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free port of 127.0.0.1; yields its API URL."""
    port = _free_port()
    env = _base_env(tmp_path / "server-home")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {HEALTH_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield api
    finally:
        _stop(proc)
        assert proc.poll() is not None, "prefect server still running after teardown"


def test_flow_runs_are_recorded_by_a_prefect_server(prefect_server, tmp_path):
    api = prefect_server
    root = demo.make_project(tmp_path / "proj")
    env = _base_env(tmp_path / "client-home")
    env["PREFECT_API_URL"] = api
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))

    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--repo", str(root), "--max-concurrency", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "| `report` | ran |" in proc.stdout  # the CLI prints the summary

    with httpx.Client(base_url=api, timeout=30) as http:
        flows = http.post("/flows/filter", json={}).json()
        assert [f["name"] for f in flows] == ["dvc-pipeline"]
        flow_runs = http.post("/flow_runs/filter", json={}).json()
        assert len(flow_runs) == 1
        flow_run = flow_runs[0]
        assert flow_run["state_type"] == "COMPLETED", flow_run["state"]

        task_runs = http.post(
            "/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}}
        ).json()
        assert sorted(tr["name"] for tr in task_runs) == sorted(demo.STAGES)
        assert {tr["state_type"] for tr in task_runs} == {"COMPLETED"}

        # stage output streamed into the task logs
        by_name = {tr["name"]: tr["id"] for tr in task_runs}
        logs = http.post(
            "/logs/filter", json={"logs": {"task_run_id": {"any_": [by_name["train@small"]]}}, "limit": 200}
        ).json()
        messages = [entry["message"] for entry in logs]
        assert any("[train@small] done" in m for m in messages), messages

        artifacts = http.post("/artifacts/filter", json={}).json()
        keys = {a["key"] for a in artifacts}
        assert {"report-results", "metrics-report", "dvc-pipeline-summary"} <= keys

        # and the UI is served next to the API
        assert http.get(api.removesuffix("/api") + "/").status_code == 200
